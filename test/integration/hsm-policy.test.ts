// The HSM key policy (hsm-policy/) against a real SoftHSM2 token: what init
// creates, how each long-term key may leave the token (its phase: open for
// cloning, sealed, not cloneable), and that a key set someone weakened or
// duplicated is refused instead of used. The phases themselves are checked as
// data at the end.
//
// SoftHSM pitfall: a process that has the library initialised does not see
// objects another process (pkcs11-tool) adds until C_Finalize. Token.close()
// finalises when it is the last Token of the process, so every test closes its
// Tokens (afterEach) and the pkcs11-tool tests close before running the tool.
import { describe, it, expect, afterEach } from 'vitest';
import { execFileSync } from 'node:child_process';
import { makeToken, type TestToken } from '../helpers/softhsm.js';
import { Token, type Handle, type KeyAttributes } from '../../vault/hsm/token.js';
import { CKR } from '../../vault/hsm/ckr.js';
import { emptyRoot, enforcePolicy, phaseOf, protectionFor, violations, type EcKey, type ResolvedKeys } from '../../hsm-policy/enforce.js';
import { anchorLabel } from '../../vault/core/state-hash.js';
import { ANCHOR, KEY_SET, PHASE_RULES, sealLabel, type KeySpec, type KeyUsage, type Phase } from '../../hsm-policy/policy.js';
import { VaultError, ErrorCodes, type ErrorCode } from '../../protocol/errors.js';

const PKCS11_TOOL = '/usr/bin/pkcs11-tool';
const ALL_USAGES: KeyUsage[] = ['derive', 'sign', 'verify', 'encrypt', 'decrypt'];

const openTokens: Token[] = [];
const testTokens: TestToken[] = [];

afterEach(() => {
  // Close every Token (so the library is finalised) before deleting token files.
  for (const tok of openTokens.splice(0)) tok.close();
  for (const t of testTokens.splice(0)) t.cleanup();
});

function fresh(): TestToken {
  const t = makeToken();
  testTokens.push(t);
  return t;
}

function open(t: TestToken, pin = t.pin, label = t.label): Token {
  const tok = Token.open({ modulePath: t.modulePath, tokenLabel: label, pin });
  openTokens.push(tok);
  return tok;
}

function closeAll(): void {
  for (const tok of openTokens.splice(0)) tok.close();
}

/** The VaultError a call throws; fails the test when it throws nothing or something else. */
function vaultErrorOf(fn: () => unknown): VaultError {
  try {
    fn();
  } catch (e) {
    if (e instanceof VaultError) return e;
    throw new Error(`expected a VaultError, got ${String(e)}`);
  }
  throw new Error('expected a VaultError, but the call succeeded');
}

function codeOf(fn: () => unknown): ErrorCode {
  return vaultErrorOf(fn).code;
}

const spec = (name: KeySpec['name']): KeySpec => KEY_SET.find((k) => k.name === name)!;

/** Every object on the token whose label starts with "bkv.", by class. */
function ourObjects(tok: Token): { private: string[]; public: string[]; secret: string[]; data: string[] } {
  const labels = (cls: 'private' | 'public' | 'secret' | 'data') =>
    tok
      .listLabels(cls, 'bkv.')
      .map((o) => o.label)
      .sort();
  return { private: labels('private'), public: labels('public'), secret: labels('secret'), data: labels('data') };
}

/** The label each KEY_SET entry has on a freshly initialised token (seal: epoch 1), in policy order. */
const INIT_LABELS = [...KEY_SET.map((s) => (s.perEpoch ? sealLabel(1) : s.label)), ANCHOR.application];

/** The long-term private/secret keys of a resolved set, each with the spec it must meet, in policy order. */
function longTermKeys(keys: ResolvedKeys): { label: string; spec: KeySpec; handle: Handle }[] {
  const out: { label: string; spec: KeySpec; handle: Handle }[] = [];
  for (const s of KEY_SET) {
    if (s.perEpoch) {
      for (const [epoch, handle] of keys.seals) out.push({ label: sealLabel(epoch), spec: s, handle });
      continue;
    }
    const resolved = (keys as unknown as Record<string, Handle | EcKey | undefined>)[s.name];
    if (resolved === undefined) throw new Error(`enforcePolicy did not resolve policy key ${s.name}`);
    const handle = s.kind === 'ec-p256' ? (resolved as EcKey).priv : (resolved as Handle);
    out.push({ label: s.label, spec: s, handle });
  }
  return out;
}

/** Create the policy's keys the way init does, except the ones named in `skip`. */
function createKeys(tok: Token, skip: KeySpec['name'][]): void {
  for (const s of KEY_SET) {
    if (skip.includes(s.name)) continue;
    if (s.kind === 'ec-p256') tok.generateEcKeyPair(s.label, s.usages);
    else if (s.perEpoch) tok.generateSecretKey(sealLabel(1), 'aes', 32, s.usages);
    else tok.generateSecretKey(s.label, s.kind === 'aes-256' ? 'aes' : 'generic', 32, s.usages);
  }
}

/** Run pkcs11-tool against the token. All Tokens of this process must be closed first. */
function pkcs11Tool(t: TestToken, args: string[]): string {
  expect(openTokens).toHaveLength(0);
  return execFileSync(
    PKCS11_TOOL,
    ['--module', t.modulePath, '--token-label', t.label, '--login', '--pin', t.pin, ...args],
    { env: { ...t.env, SOFTHSM2_CONF: t.conf }, encoding: 'utf8', stdio: 'pipe' },
  );
}

describe('enforcePolicy creates and resolves the key set', () => {
  it('creates kx, sig, oprf, verifier and seal epoch 1 on a fresh token, and nothing else', () => {
    const t = fresh();
    const tok = open(t);
    expect(ourObjects(tok)).toEqual({ private: [], public: [], secret: [], data: [] });

    const keys = enforcePolicy(tok, { create: true });

    // Everything the policy lists (the brief's five at least), in policy order.
    expect(keys.created).toEqual(INIT_LABELS);
    expect(keys.created).toEqual(expect.arrayContaining(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.seal.000001']));
    expect([...keys.seals.keys()]).toEqual([1]);
    for (const ec of [keys.kx, keys.sig, keys.oprf]) {
      expect(ec.point).toHaveLength(65);
      expect(ec.point[0]).toBe(0x04);
    }
    // Three distinct key pairs, not one key under three names.
    const points = new Set([keys.kx, keys.sig, keys.oprf].map((k) => Buffer.from(k.point).toString('hex')));
    expect(points.size).toBe(3);
    // One object per secret key and a private/public pair per EC key; nothing more.
    const ec = KEY_SET.filter((k) => k.kind === 'ec-p256').map((k) => k.label).sort();
    const secret = KEY_SET.filter((k) => k.kind !== 'ec-p256').map((k) => (k.perEpoch ? sealLabel(1) : k.label)).sort();
    expect(ec).toEqual(['bkv.kx', 'bkv.oprf', 'bkv.sig']);
    // Both state anchor slots start at batch 0 over the empty state.
    const start = anchorLabel(0, emptyRoot());
    expect(ourObjects(tok)).toEqual({ private: ec, public: ec, secret, data: [start, start] });
  });

  it('is idempotent: a second run creates nothing and resolves the same keys', () => {
    const t = fresh();
    const tok = open(t);
    const first = enforcePolicy(tok, { create: true });
    const before = ourObjects(tok);

    const again = enforcePolicy(tok, { create: true });
    expect(again.created).toEqual([]);
    expect(ourObjects(tok)).toEqual(before);

    const resolvedOnly = enforcePolicy(tok, { create: false });
    expect(resolvedOnly.created).toEqual([]);

    for (const k of [again, resolvedOnly]) {
      expect(Buffer.from(k.kx.point)).toEqual(Buffer.from(first.kx.point));
      expect(Buffer.from(k.sig.point)).toEqual(Buffer.from(first.sig.point));
      expect(Buffer.from(k.oprf.point)).toEqual(Buffer.from(first.oprf.point));
      // Same objects (handles are stable within this process), every key of the set.
      expect(longTermKeys(k).map(({ label, handle }) => ({ label, handle }))).toEqual(
        longTermKeys(first).map(({ label, handle }) => ({ label, handle })),
      );
      expect([...k.seals.entries()]).toEqual([...first.seals.entries()]);
    }
  });

  it('resolves the same key points from a separate login (keys are on the token, not in the session)', () => {
    const t = fresh();
    const first = enforcePolicy(open(t), { create: true });
    const points = [first.kx, first.sig, first.oprf].map((k) => Buffer.from(k.point).toString('hex'));
    closeAll();

    const again = enforcePolicy(open(t), { create: false });
    expect(again.created).toEqual([]);
    expect([again.kx, again.sig, again.oprf].map((k) => Buffer.from(k.point).toString('hex'))).toEqual(points);
  });

  it('with create:true on a token missing only the verifier (and the anchor), creates just those', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, ['verifier']);
    const keys = enforcePolicy(tok, { create: true });
    expect(keys.created).toEqual(['bkv.verifier', ANCHOR.application]);
    expect(tok.find('secret', 'bkv.verifier')).toHaveLength(1);
  });

  it('with create:false on a fresh token throws HSM_POLICY_VIOLATION (missing key) and creates nothing', () => {
    const t = fresh();
    const tok = open(t);
    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('missing');
    expect(err.message).toContain('bkv.kx');
    expect(ourObjects(tok)).toEqual({ private: [], public: [], secret: [], data: [] });
  });

  it('with create:false on a token missing only the verifier throws and creates nothing', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, ['verifier']);
    const before = ourObjects(tok);
    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('"bkv.verifier" is missing');
    expect(ourObjects(tok)).toEqual(before);
  });
});

/** The protection attributes of a key, for comparing with what a phase demands. */
function protection(a: KeyAttributes) {
  return {
    label: a.label,
    token: a.token,
    private: a.private,
    sensitive: a.sensitive,
    extractable: a.extractable,
    wrapWithTrusted: a.wrapWithTrusted,
    neverExtractable: a.neverExtractable,
    alwaysSensitive: a.alwaysSensitive,
    local: a.local,
    modifiable: a.modifiable,
    allowedMechanisms: a.allowedMechanisms,
    wrap: a.wrap,
    unwrap: a.unwrap,
  };
}

/** Usages and key type exactly as the policy lists them. */
function expectUsagesAndKind(a: KeyAttributes, s: KeySpec): void {
  const label = a.label;
  const usages = ALL_USAGES.filter((u) => a[u]);
  expect({ label, usages }).toEqual({ label, usages: ALL_USAGES.filter((u) => s.usages.includes(u)) });
  const kind = a.keyType === 'ec' ? 'ec-p256' : a.keyType === 'aes' ? 'aes-256' : a.keyType === 'generic' ? 'hmac-256' : 'other';
  expect({ label, kind }).toEqual({ label, kind: s.kind });
  if (s.kind !== 'ec-p256') expect({ label, valueLen: a.valueLen }).toEqual({ label, valueLen: 32 });
}

describe('how long-term keys may leave the token', () => {
  it('a new vault\'s keys are open for cloning: refused under an untrusted wrapping key, and exactly the open phase\'s attributes', () => {
    const t = fresh();
    const tok = open(t);
    const keys = enforcePolicy(tok, { create: true });
    expect(keys.phase).toBe('open');
    const wrapping = tok.sessionWrappingKey();
    const checked = longTermKeys(keys);
    // Every key of the policy (the anchor is a data object, not a key).
    expect(checked.map((k) => k.label)).toEqual(INIT_LABELS.filter((l) => l !== ANCHOR.application));
    expect(checked.map((k) => k.label)).toEqual(expect.arrayContaining(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.seal.000001']));

    for (const { label, spec: s, handle } of checked) {
      // CKA_WRAP_WITH_TRUSTED: SoftHSM refuses any wrapping key the SO did not mark trusted (0x69).
      expect({ label, ckr: tok.tryWrap(wrapping, handle) }).toEqual({ label, ckr: CKR.KEY_NOT_WRAPPABLE });
      const a = tok.attributes(handle);
      expect(protection(a)).toEqual({
        label,
        token: true,
        private: true,
        sensitive: true,
        extractable: true,
        wrapWithTrusted: true,
        neverExtractable: false,
        alwaysSensitive: true,
        local: true,
        // Needed to lower CKA_EXTRACTABLE at the seal; CKA_ALLOWED_MECHANISMS (read-only) keeps a widened usage flag useless.
        modifiable: true,
        allowedMechanisms: [s.mechanism],
        wrap: false,
        unwrap: false,
      });
      expectUsagesAndKind(a, s);
    }
    expect(keys.phases.map((p) => p.phase)).toEqual(checked.map(() => 'open'));
  });

  it('a key set made the old way is "not cloneable": every key refuses C_WrapKey with CKR_KEY_UNEXTRACTABLE, and it still resolves', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, []);
    const keys = enforcePolicy(tok, { create: true });
    // Only the anchor was missing: the keys stay as they were made.
    expect(keys.created).toEqual([ANCHOR.application]);
    expect(keys.phase).toBe('not-cloneable');
    const wrapping = tok.sessionWrappingKey();
    for (const { label, spec: s, handle } of longTermKeys(keys)) {
      expect({ label, ckr: tok.tryWrap(wrapping, handle) }).toEqual({ label, ckr: CKR.KEY_UNEXTRACTABLE });
      const a = tok.attributes(handle);
      expect({ label, extractable: a.extractable, neverExtractable: a.neverExtractable, alwaysSensitive: a.alwaysSensitive, modifiable: a.modifiable }).toEqual({
        label,
        extractable: false,
        neverExtractable: true,
        alwaysSensitive: true,
        modifiable: false,
      });
      expectUsagesAndKind(a, s);
    }
  });

  it('a key missing from an old-way set is made in the set\'s phase, not open', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, ['verifier']);
    const keys = enforcePolicy(tok, { create: true });
    expect(keys.created).toEqual(['bkv.verifier', ANCHOR.application]);
    expect(keys.phase).toBe('not-cloneable');
  });

  it('tryWrap really detects an extractable key (control: an extractable key is wrapped, and the policy refuses it)', () => {
    const t = fresh();
    createKeys(open(t), ['verifier']);
    closeAll();
    pkcs11Tool(t, ['--keygen', '--key-type', 'GENERIC:32', '--label', 'bkv.verifier', '--sensitive', '--private', '--extractable']);

    const tok = open(t);
    const found = tok.find('secret', 'bkv.verifier');
    expect(found).toHaveLength(1);
    const h = found[0]!;
    expect(tok.attributes(h).extractable).toBe(true);
    expect(tok.tryWrap(tok.sessionWrappingKey(), h)).toBe(CKR.OK);

    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    // Extractable without CKA_WRAP_WITH_TRUSTED matches no phase; the nearest one says what is missing.
    expect(err.message).toContain('bkv.verifier: CKA_WRAP_WITH_TRUSTED is false, policy requires true (nearest phase: open');
    expect(err.message).toContain('bkv.verifier: CKA_ALLOWED_MECHANISMS is [], policy requires [CKM_SHA256_HMAC]');
  });
});

describe('a weakened or ambiguous key set is refused', () => {
  it('refuses a non-sensitive bkv.verifier made with pkcs11-tool, naming the key and CKA_SENSITIVE', () => {
    const t = fresh();
    createKeys(open(t), ['verifier']);
    // pkcs11-tool runs in another process: finalise ours first so we see its key.
    closeAll();
    const out = pkcs11Tool(t, ['--keygen', '--key-type', 'GENERIC:32', '--label', 'bkv.verifier']);
    expect(out).toContain('bkv.verifier');

    const tok = open(t);
    const found = tok.find('secret', 'bkv.verifier');
    expect(found).toHaveLength(1); // the tool's key is visible: the refusal below is about it, not a missing key
    const attrs = tok.attributes(found[0]!);
    expect(attrs.sensitive).toBe(false);

    for (const create of [false, true]) {
      const err = vaultErrorOf(() => enforcePolicy(tok, { create }));
      expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
      expect(err.message).toContain('bkv.verifier: CKA_SENSITIVE is false, policy requires true');
      expect(err.message).toContain('bkv.verifier: CKA_ALWAYS_SENSITIVE is false, policy requires true');
      expect(err.message).not.toContain('missing');
    }
    // create:true did not paper over the bad key with a second one.
    expect(tok.find('secret', 'bkv.verifier')).toHaveLength(1);
  });

  it('refuses a duplicate bkv.oprf key pair as ambiguous', () => {
    const t = fresh();
    const tok = open(t);
    enforcePolicy(tok, { create: true });
    tok.generateEcKeyPair('bkv.oprf', ['derive']);

    for (const create of [false, true]) {
      const err = vaultErrorOf(() => enforcePolicy(tok, { create }));
      expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
      expect(err.message).toContain('"bkv.oprf"');
      expect(err.message).toContain('ambiguous');
    }
  });

  it('refuses a duplicate seal epoch key as ambiguous', () => {
    const t = fresh();
    const tok = open(t);
    enforcePolicy(tok, { create: true });
    tok.generateSecretKey(sealLabel(1), 'aes', 32, ['encrypt', 'decrypt']);

    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('"bkv.seal.000001"');
    expect(err.message).toContain('ambiguous');
  });

  it('refuses a seal key with an extra usage, naming CKA_SIGN', () => {
    const t = fresh();
    const tok = open(t);
    enforcePolicy(tok, { create: true });
    tok.generateSecretKey(sealLabel(2), 'aes', 32, ['encrypt', 'decrypt', 'sign']);

    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('bkv.seal.000002: CKA_SIGN is true, policy requires false');
    expect(err.message).not.toContain('bkv.seal.000001');
  });

  it('accepts a well-formed second seal epoch (control for the test above)', () => {
    const t = fresh();
    const tok = open(t);
    enforcePolicy(tok, { create: true });
    tok.generateSecretKey(sealLabel(2), 'aes', 32, ['encrypt', 'decrypt']);

    const keys = enforcePolicy(tok, { create: false });
    expect([...keys.seals.keys()].sort((a, b) => a - b)).toEqual([1, 2]);
    expect(keys.created).toEqual([]);
  });

  it('refuses a policy key of the wrong type (AES under the verifier label)', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, ['verifier']);
    // An AES key under the verifier's label, with the verifier's usages.
    tok.generateSecretKey('bkv.verifier', 'aes', 32, ['sign', 'verify']);
    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('bkv.verifier: key type is not hmac-256');
  });

  it('refuses a sig key that can also derive (extra usage on an EC private key)', () => {
    const t = fresh();
    const tok = open(t);
    createKeys(tok, ['sig']);
    tok.generateEcKeyPair('bkv.sig', ['sign', 'derive']);
    const err = vaultErrorOf(() => enforcePolicy(tok, { create: false }));
    expect(err.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(err.message).toContain('bkv.sig: CKA_DERIVE is true, policy requires false');
  });
});

describe('opening the token', () => {
  it('fails fast with HSM_PIN_INCORRECT on a wrong PIN, and the right PIN still works afterwards', () => {
    const t = fresh();
    expect(codeOf(() => open(t, t.pin + 'x'))).toBe(ErrorCodes.HSM_PIN_INCORRECT);
    expect(openTokens).toHaveLength(0);
    const tok = open(t);
    expect(tok.ping()).toBe(true);
  });

  it('gives HSM_TOKEN_NOT_FOUND for an unknown token label', () => {
    const t = fresh();
    expect(codeOf(() => open(t, t.pin, `${t.label}-nope`))).toBe(ErrorCodes.HSM_TOKEN_NOT_FOUND);
    expect(openTokens).toHaveLength(0);
  });

  // While another Token of this process is logged in to the same token, C_Login
  // answers CKR_USER_ALREADY_LOGGED_IN before it checks the PIN; the token layer
  // must still refuse a wrong PIN (it compares with the PIN that logged in).
  it('refuses a wrong PIN even while another Token is logged in to the same token', () => {
    const t = fresh();
    open(t);
    expect(codeOf(() => open(t, t.pin + 'x'))).toBe(ErrorCodes.HSM_PIN_INCORRECT);
  });
});

describe('the phases are data: which protection a key may have (table-driven, no HSM)', () => {
  const verifier = spec('verifier');
  /** The verifier's attributes with the given protection; usages and type as the policy wants. */
  const key = (p: Partial<KeyAttributes>): KeyAttributes => ({
    label: 'bkv.verifier',
    keyType: 'generic',
    token: true,
    private: true,
    sensitive: true,
    extractable: false,
    alwaysSensitive: true,
    neverExtractable: true,
    modifiable: false,
    derive: false,
    sign: true,
    verify: true,
    encrypt: false,
    decrypt: false,
    wrap: false,
    unwrap: false,
    valueLen: 32,
    ecParams: Buffer.alloc(0),
    wrapWithTrusted: false,
    local: true,
    trusted: false,
    allowedMechanisms: [],
    ...p,
  });
  const own = ['CKM_SHA256_HMAC'];
  const open = { extractable: true, wrapWithTrusted: true, neverExtractable: false, modifiable: true, allowedMechanisms: own };
  const clone = { alwaysSensitive: false, neverExtractable: false, local: false };

  const accepted: [string, Partial<KeyAttributes>, Phase, number][] = [
    ['generated never extractable (vaults made before the ceremony): not-cloneable', {}, 'not-cloneable', 0],
    ['the same, with CKA_WRAP_WITH_TRUSTED set (irrelevant when never extractable)', { wrapWithTrusted: true }, 'not-cloneable', 0],
    ['generated open for cloning', open, 'open', 1],
    ['unwrapped by the ceremony (a clone), open', { ...open, ...clone }, 'open', 2],
    ['generated open, then sealed', { ...open, extractable: false }, 'sealed', 3],
    ['generated sealed (a rotation after the seal)', { ...open, extractable: false, neverExtractable: true }, 'sealed', 4],
    ['a clone, then sealed', { ...open, ...clone, extractable: false }, 'sealed', 5],
    ['cloned by the HSM vendor from a never-extractable key', { ...clone }, 'vendor-clone', 6],
    ['a vendor clone of an open key is an open clone', { ...open, ...clone }, 'open', 2],
  ];
  it.each(accepted)('accepts a key %s', (_name, p, phase, row) => {
    const a = key(p);
    expect(violations(verifier, a)).toEqual([]);
    expect(phaseOf(verifier, a)).toBe(PHASE_RULES[row]);
    expect(phaseOf(verifier, a)!.phase).toBe(phase);
  });

  it('every row of PHASE_RULES is reachable (the table above covers the whole policy)', () => {
    expect(new Set(accepted.map((r) => r[3]))).toEqual(new Set(PHASE_RULES.map((_r, i) => i)));
  });

  const refused: [string, Partial<KeyAttributes>, string][] = [
    ['extractable without CKA_WRAP_WITH_TRUSTED (leaves under any key)', { ...open, wrapWithTrusted: false }, 'CKA_WRAP_WITH_TRUSTED is false, policy requires true'],
    ['open and modifiable without CKA_ALLOWED_MECHANISMS (a widened usage would work)', { ...open, allowedMechanisms: [] }, 'CKA_ALLOWED_MECHANISMS is [], policy requires [CKM_SHA256_HMAC]'],
    ['open with a second allowed mechanism', { ...open, allowedMechanisms: ['CKM_SHA256_HMAC', 'CKM_AES_GCM'] }, 'CKA_ALLOWED_MECHANISMS is [CKM_SHA256_HMAC, CKM_AES_GCM]'],
    ['open but not modifiable (it could never be sealed)', { ...open, modifiable: false }, 'CKA_MODIFIABLE is false, policy requires true'],
    ['never extractable but modifiable (the old template, weakened)', { modifiable: true }, 'CKA_MODIFIABLE is true, policy requires false'],
    ['generated here, but once not sensitive (seen in the clear)', { ...open, alwaysSensitive: false }, 'CKA_ALWAYS_SENSITIVE is false, policy requires true'],
    ['a vendor clone that may leave the token', { ...clone, extractable: true }, 'CKA_EXTRACTABLE is true, policy requires false'],
    ['not sensitive, whatever the phase', { ...open, sensitive: false }, 'CKA_SENSITIVE is false, policy requires true'],
    ['a wrapping key', { ...open, wrap: true }, 'CKA_WRAP is true, policy requires false'],
  ];
  it.each(refused)('refuses %s', (_name, p, message) => {
    const a = key(p);
    expect(violations(verifier, a).join('; ')).toContain(`bkv.verifier: ${message}`);
    if (!('sensitive' in p) && !('wrap' in p)) expect(phaseOf(verifier, a)).toBeUndefined();
  });

  it('what a phase creates keys with is what that phase accepts (create ↔ check agree)', () => {
    const generated = { local: true, alwaysSensitive: true };
    for (const phase of ['open', 'sealed', 'not-cloneable'] as const) {
      const p = protectionFor(verifier, phase);
      const a = p
        ? key({ ...generated, extractable: p.extractable, wrapWithTrusted: p.wrapWithTrusted, modifiable: p.modifiable, allowedMechanisms: p.allowedMechanisms, neverExtractable: !p.extractable })
        : key(generated);
      expect({ phase, got: phaseOf(verifier, a)?.phase }).toEqual({ phase, got: phase });
    }
    // A vendor clone's vault makes new keys (a rotation) the old way: never extractable.
    expect(protectionFor(verifier, 'vendor-clone')).toBeUndefined();
  });
});
