// The key ceremony's steps as library functions (vault/ceremony/steps.ts) on
// real SoftHSM2 tokens in this process: what the CLI test cannot reach from
// outside. A source that wraps the wrong key is caught by the known answers and
// leaves the target as it was; an epoch bundle is what a cohort will use after
// a rotation; a second full export needs a second trust.
//
// Login state is per process and token: every Token of a token is closed before
// a Security Officer session on it (trust), as bkv-admin does.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import pino from 'pino';
import { makeToken, type TestToken } from '../helpers/softhsm.js';
import { Token } from '../../vault/hsm/token.js';
import { tokenKeys } from '../../vault/hsm/token-port.js';
import type { VaultKeys } from '../../vault/hsm/vault-keys.js';
import { enforcePolicy, protectionFor } from '../../hsm-policy/enforce.js';
import { KEY_SET, sealLabel } from '../../hsm-policy/policy.js';
import { bundleDigest, parseBundle, parseTarget, serializeBundle, type Bundle, type Target } from '../../vault/ceremony/bundle.js';
import { exportBundle, importBundle, labelledKeys, targetInit, trust } from '../../vault/ceremony/steps.js';
import { reanchor } from '../../vault/ceremony/reanchor.js';
import { openVault } from '../../vault/core/open.js';
import { tempVault, TEST_KDF } from '../helpers/vault.js';
import { enroll, recover } from '../helpers/flows.js';
import { copyFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { fromHex, utf8 } from '../../protocol/bytes.js';

const log = pino({ level: 'silent' });
const tokens: TestToken[] = [];
let A: TestToken; // the source vault
let C: TestToken; // another vault
let T: TestToken; // the clone target
let target: Target;

const cfg = (t: TestToken) => ({ modulePath: t.modulePath, tokenLabel: t.label, pin: t.pin });

function withToken<R>(t: TestToken, fn: (tok: Token) => R): R {
  const tok = Token.open(cfg(t));
  try {
    return fn(tok);
  } finally {
    tok.close();
  }
}

/** Every object on a token, by class and label: what a refused step must leave exactly as it was. */
const objects = (t: TestToken) =>
  withToken(t, (tok) =>
    tok
      .objects()
      .map((o) => `${o.cls} ${o.label}`)
      .sort(),
  );

function refusal(fn: () => unknown): VaultError {
  try {
    fn();
  } catch (e) {
    if (e instanceof VaultError) return e;
    throw e;
  }
  throw new Error('expected a refusal, but the step succeeded');
}

function newVault(): TestToken {
  const t = makeToken();
  tokens.push(t);
  withToken(t, (tok) => enforcePolicy(tok, { create: true }));
  return t;
}

const fullExport = (src: TestToken) => withToken(src, (tok) => exportBundle(tok, target, { includeAnchor: true }, log));

beforeAll(() => {
  A = newVault();
  C = newVault();
  T = makeToken();
  tokens.push(T);
  target = parseTarget(JSON.stringify(withToken(T, (tok) => targetInit(tok, log)).target));
});

afterAll(() => {
  for (const t of tokens) t.cleanup();
});

describe('the known-answer test proves the copy is the source key', () => {
  it('catches a source that wrapped another vault\'s key: CEREMONY_SELF_TEST_FAILED names it, and the target is left as it was', () => {
    trust(cfg(A), A.soPin, target, log);
    trust(cfg(C), C.soPin, target, log);
    const fromA = parseBundle(fullExport(A).text);
    const fromC = parseBundle(fullExport(C).text);
    // A faulty (or hostile) source: A's bundle, but the verifier blob is C's, wrapped for the
    // same target, and the whole bundle signed by A's real key — signature and vault id pass.
    const spliced: Bundle = { ...fromA, keys: fromA.keys.map((k) => (k.label === 'bkv.verifier' ? fromC.keys.find((c) => c.label === k.label)! : k)) };
    const signature = withToken(A, (tok) => tok.ecdsaSign(enforcePolicy(tok, { create: false }).sig.priv, bundleDigest(spliced)));
    const forged = parseBundle(serializeBundle(spliced, signature));

    const before = objects(T);
    expect(before).toEqual(['private bkv.ceremony.unwrap', 'public bkv.ceremony.unwrap']);
    const e = withToken(T, (tok) => refusal(() => importBundle(tok, forged, { expectVaultId: fromA.vaultId }, log)));
    expect(e.code).toBe(ErrorCodes.CEREMONY_SELF_TEST_FAILED);
    expect(e.message).toContain('bkv.verifier');
    expect(e.message).not.toContain('bkv.tenant');
    expect(objects(T)).toEqual(before);

    // A full import names the vault it expects (compared out of band), or nothing happens.
    expect(withToken(T, (tok) => refusal(() => importBundle(tok, fromA, {}, log))).code).toBe(ErrorCodes.BAD_REQUEST);
    expect(objects(T)).toEqual(before);

    // Control: the bundle A really made imports, and the clone answers as A does.
    const r = withToken(T, (tok) => importBundle(tok, fromA, { expectVaultId: fromA.vaultId }, log));
    expect(r).toMatchObject({ kind: 'full', vaultId: fromA.vaultId, anchor: { seq: 0, fromSource: true } });
    const probe = utf8('the same verifier on both HSMs');
    const macA = withToken(A, (tok) => tok.hmacSha256(enforcePolicy(tok, { create: false }).verifier, probe));
    const macT = withToken(T, (tok) => tok.hmacSha256(enforcePolicy(tok, { create: false }).verifier, probe));
    expect(Buffer.from(macT)).toEqual(Buffer.from(macA));
  });

  it('a second full export needs a second trust: the first consumed the transport key (CEREMONY_TRANSPORT_MISSING)', () => {
    const e = withToken(A, (tok) => refusal(() => exportBundle(tok, target, { includeAnchor: false }, log)));
    expect(e.code).toBe(ErrorCodes.CEREMONY_TRANSPORT_MISSING);
    expect(e.message).toMatch(/run trust again/);
    // The target's public key stays trusted: seal epochs can still follow without the SO.
    expect(withToken(A, (tok) => tok.trustedKeys().map((k) => k.label))).toEqual([`bkv.ceremony.trust.${target.fingerprint.slice(0, 16)}`]);
  });
});

describe('a new seal epoch, cloned alone (what a cohort does after a rotation)', () => {
  it('exportBundle({ epoch }) on the rotated HSM, importBundle on the clone: a record sealed on one opens on the other', async () => {
    const seal = KEY_SET.find((k) => k.perEpoch)!;
    // The rotation's new key, made as an open vault makes it (hsm/keys.ts addEpoch).
    withToken(A, (tok) => tok.generateSecretKey(sealLabel(2), 'aes', 32, seal.usages, protectionFor(seal, 'open')));
    const ex = withToken(A, (tok) => exportBundle(tok, target, { epoch: 2, includeAnchor: true }, log));
    expect(ex.labels).toEqual(['bkv.seal.000002']);
    const b = parseBundle(ex.text);
    expect(b).toMatchObject({ kind: 'epoch', transport: null, anchor: null });

    // Not for another vault: C's token holds a different vault (and is no target anyway).
    const cBefore = objects(C);
    expect(withToken(C, (tok) => refusal(() => importBundle(tok, b, {}, log))).code).toBe(ErrorCodes.CEREMONY_VAULT_MISMATCH);
    expect(objects(C)).toEqual(cBefore);

    const r = withToken(T, (tok) => importBundle(tok, b, {}, log));
    expect(r).toMatchObject({ kind: 'epoch', labels: ['bkv.seal.000002'] });
    expect(r.already).toBeUndefined();
    // Idempotent: the same bundle again is recognised, not duplicated.
    expect(withToken(T, (tok) => importBundle(tok, b, {}, log)).already).toBe(true);

    const aad = utf8('record aad');
    const sealedOnA = await withTokenAsync(A, (k) => k.seal(2, aad, utf8('envelope bytes')));
    const opened = await withTokenAsync(T, (k) => k.unseal(2, aad, sealedOnA));
    expect(Buffer.from(opened!).toString()).toBe('envelope bytes');
    // The clone's copy is open, like the rest of its set.
    const phases = withToken(T, (tok) => enforcePolicy(tok, { create: false }).phases);
    expect(phases.find((p) => p.label === 'bkv.seal.000002')).toMatchObject({ phase: 'open', origin: expect.stringContaining('ceremony') });
  });

  it('an epoch this HSM does not have: RECORD_NOT_FOUND naming the epochs it has', () => {
    const e = withToken(A, (tok) => refusal(() => exportBundle(tok, target, { epoch: 7, includeAnchor: false }, log)));
    expect(e.code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(e.message).toContain('epochs: 1, 2');
  });
});

describe('replacing a dead HSM with a standby clone made earlier', () => {
  it('reanchor moves the clone\'s anchor forward to the live database (never back); then the clone serves every record', async () => {
    const tv = await tempVault();
    tokens.push(tv.token);
    const k1 = randomBytes(32);
    await enroll(tv.vault, 'early', 'pw early', k1);
    tv.stop();
    // The standby: a clone made while the vault was stopped, anchor and database as they stood.
    const S = makeToken();
    tokens.push(S);
    const standby = parseTarget(JSON.stringify(withToken(S, (tok) => targetInit(tok, log)).target));
    trust(cfg(tv.token), tv.token.soPin, standby, log);
    const b = parseBundle(withToken(tv.token, (tok) => exportBundle(tok, standby, { includeAnchor: true }, log)).text);
    withToken(S, (tok) => importBundle(tok, b, { expectVaultId: b.vaultId }, log));
    const oldCopy = `${tv.dbPath}.at-export`;
    copyFileSync(tv.dbPath, oldCopy);

    // The vault lives on: more batches, then its HSM dies. The live database is ahead of the standby's anchor.
    await tv.reopen();
    const k2 = randomBytes(32);
    await enroll(tv.vault, 'late', 'pw late', k2);
    expect((await recover(tv.vault, 'early', 'wrong')).outcome).toBe('wrong-password');
    tv.stop();

    // Forward to the live database; again: nothing to do; to the copy taken at export: that would be back, refused.
    const r = withToken(S, (tok) => reanchor(tok, tv.dbPath, log));
    expect(r.already).toBe(false);
    expect(r.toSeq).toBeGreaterThan(r.fromSeq);
    expect(r.fromSeq).toBe(b.anchor!.seq);
    expect(withToken(S, (tok) => reanchor(tok, tv.dbPath, log)).already).toBe(true);
    const back = withToken(S, (tok) => refusal(() => reanchor(tok, oldCopy, log)));
    expect(back.code).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    // Another vault's database: refused before anything is written.
    const other = await tempVault();
    tokens.push(other.token);
    other.stop();
    expect(withToken(S, (tok) => refusal(() => reanchor(tok, other.dbPath, log))).code).toBe(ErrorCodes.CEREMONY_VAULT_MISMATCH);

    // The standby serves the live database: both users, with the attempt spent on the dead HSM still counted.
    const v = await openVault({ hsm: cfg(S), dbPath: tv.dbPath, log, vault: { kdfFloor: TEST_KDF } });
    try {
      expect(v.status('early')).toMatchObject({ attemptsLeft: 9 });
      const late = await recover(v, 'late', 'pw late');
      expect(late.outcome).toBe('ok');
      expect(Buffer.from((late as { key: Uint8Array }).key)).toEqual(k2);
    } finally {
      v.close();
      v.store.close();
      await v.keys.close();
    }
  });
});

describe('bundle and target files', () => {
  it('refuse what is not theirs with CEREMONY_BUNDLE_MALFORMED, naming the problem', () => {
    const code = (fn: () => unknown) => refusal(fn).code;
    expect(code(() => parseBundle('not json'))).toBe(ErrorCodes.CEREMONY_BUNDLE_MALFORMED);
    expect(code(() => parseBundle(JSON.stringify({ format: 'bkv-ceremony-bundle' })))).toBe(ErrorCodes.CEREMONY_BUNDLE_MALFORMED);
    expect(code(() => parseTarget('{}'))).toBe(ErrorCodes.CEREMONY_BUNDLE_MALFORMED);
    // A target file whose fingerprint was edited (or whose key was swapped under it).
    const file = { format: target.format, version: target.version, fingerprint: 'ab'.repeat(32), publicKey: target.publicKey, tokenLabel: target.tokenLabel, createdAt: target.createdAt };
    const e = refusal(() => parseTarget(JSON.stringify(file)));
    expect(e.code).toBe(ErrorCodes.CEREMONY_BUNDLE_MALFORMED);
    expect(e.message).toMatch(/fingerprint is not the fingerprint of its public key/);
  });

  it('the labelled keys are the whole set the policy names', () => {
    const labels = withToken(A, (tok) => labelledKeys(enforcePolicy(tok, { create: false })).map((k) => k.label));
    expect(labels).toEqual(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.tenant', 'bkv.seal.000001', 'bkv.seal.000002']);
    expect(fromHex(target.fingerprint)).toHaveLength(32);
  });
});

/** The vault's keys (what it seals records with) on a test token, on this thread. */
async function withTokenAsync<R>(t: TestToken, fn: (k: VaultKeys) => Promise<R>): Promise<R> {
  const tok = Token.open(cfg(t));
  try {
    const r = enforcePolicy(tok, { create: false });
    return await fn(tokenKeys(tok, r));
  } finally {
    tok.close();
  }
}
