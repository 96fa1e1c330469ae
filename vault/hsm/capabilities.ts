// What this PKCS#11 module and token can do for the vault, measured with the
// vault's own calls on throwaway objects: the facts behind "any PKCS#11 HSM with
// the needed mechanisms". Three users:
//   - `bkv-admin hsm check` prints the report;
//   - `init` runs it before creating anything and refuses, naming what is missing;
//   - every start runs it, learns the module's quirks (ModuleQuirks, token.ts)
//     and refuses to serve keys the module lets out wrapped unless accepted.
// Quirks are chosen here by what was measured, never by the module's name.
//
// Everything it makes is a session object (gone with the session) except two
// token objects that are destroyed at once: a data object shaped like an anchor
// slot, and one whose label it rewrites. Stale ones from a crashed check
// ("bkv.probe…") are removed first. Wrapping a vault key, when the token lets it,
// yields bytes under a session key this process made; they are zeroed unused.
import { KEY_SET, type KeySpec } from '../../hsm-policy/policy.js';
import { phaseOf, protectionFor } from '../../hsm-policy/enforce.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { Token, DEFAULT_QUIRKS, type Handle, type ModuleQuirks, type TokenConfig } from './token.js';
import { CKR, ckrText } from './ckr.js';

/** CKF_ mechanism flags the vault relies on (PKCS#11 2.40, table 34). */
const CKF: Record<string, number> = {
  CKF_ENCRYPT: 0x100,
  CKF_DECRYPT: 0x200,
  CKF_DIGEST: 0x400,
  CKF_SIGN: 0x800,
  CKF_VERIFY: 0x2000,
  CKF_GENERATE: 0x8000,
  CKF_GENERATE_KEY_PAIR: 0x10000,
  CKF_WRAP: 0x20000,
  CKF_UNWRAP: 0x40000,
  CKF_DERIVE: 0x80000,
  CKF_EC_F_P: 0x100000,
  CKF_EC_NAMEDCURVE: 0x800000,
  CKF_EC_UNCOMPRESS: 0x1000000,
};

export const flagNames = (flags: number): string[] => Object.entries(CKF).filter(([, v]) => (flags & v) !== 0).map(([k]) => k);

export interface MechanismNeed {
  name: string;
  /** Flags C_GetMechanismInfo must report. */
  flags: string[];
  /** A key size that must lie within [min, max]: bits for EC, bytes or bits for AES (modules differ). */
  keySize?: { bits: number; bytes?: number };
  /** Why the vault needs it. */
  purpose: string;
  /** false: only the key ceremony (cloning) needs it; its absence is reported, not refused. */
  required: boolean;
}

const GENERATE: Record<KeySpec['kind'], MechanismNeed> = {
  'ec-p256': { name: 'CKM_EC_KEY_PAIR_GEN', flags: ['CKF_GENERATE_KEY_PAIR'], keySize: { bits: 256 }, purpose: 'makes the P-256 keys', required: true },
  'aes-256': { name: 'CKM_AES_KEY_GEN', flags: ['CKF_GENERATE'], keySize: { bits: 256, bytes: 32 }, purpose: 'makes the AES-256 seal keys', required: true },
  'hmac-256': { name: 'CKM_GENERIC_SECRET_KEY_GEN', flags: ['CKF_GENERATE'], purpose: 'makes the 256-bit HMAC keys', required: true },
};

const USE_FLAGS: Record<KeySpec['mechanism'], string[]> = {
  CKM_ECDH1_DERIVE: ['CKF_DERIVE'],
  CKM_ECDSA: ['CKF_SIGN'],
  CKM_SHA256_HMAC: ['CKF_SIGN'],
  CKM_AES_GCM: ['CKF_ENCRYPT', 'CKF_DECRYPT'],
};

/** Every mechanism the policy's key set needs (hsm-policy/policy.ts), then the ceremony's. */
export function mechanismNeeds(): MechanismNeed[] {
  const out = new Map<string, MechanismNeed>();
  for (const k of KEY_SET) {
    const gen = GENERATE[k.kind];
    if (!out.has(gen.name)) out.set(gen.name, gen);
    const prior = out.get(k.mechanism);
    const purpose = `${prior ? `${prior.purpose}; ` : ''}${k.label}${k.perEpoch ? 'NNNNNN' : ''}`;
    out.set(k.mechanism, {
      name: k.mechanism,
      flags: USE_FLAGS[k.mechanism],
      ...(k.kind === 'ec-p256' ? { keySize: { bits: 256 } } : k.kind === 'aes-256' ? { keySize: { bits: 256, bytes: 32 } } : {}),
      purpose,
      required: true,
    });
  }
  for (const n of [
    { name: 'CKM_RSA_PKCS_KEY_PAIR_GEN', flags: ['CKF_GENERATE_KEY_PAIR'], purpose: 'key ceremony: a clone target\'s unwrap key' },
    { name: 'CKM_RSA_PKCS_OAEP', flags: ['CKF_WRAP', 'CKF_UNWRAP'], purpose: 'key ceremony: carries secret keys to a clone' },
    { name: 'CKM_AES_KEY_WRAP_PAD', flags: ['CKF_WRAP', 'CKF_UNWRAP'], purpose: 'key ceremony: carries EC keys to a clone' },
  ]) {
    out.set(n.name, { ...n, required: false });
  }
  return [...out.values()];
}

export interface MechanismRow {
  name: string;
  required: boolean;
  purpose: string;
  present: boolean;
  minKeySize?: number;
  maxKeySize?: number;
  flags: string[];
  /** What is wrong, if anything: not listed, a flag or the key size missing. */
  problem?: string;
}

export interface CheckRow {
  /** Short id, e.g. "anchor.data-object". */
  name: string;
  ok: boolean;
  /** The PKCS#11 answer, by name ("CKR_OK (0x0)" when it worked). */
  answer: string;
  detail: string;
  /** Refuses init and start when false. */
  required: boolean;
}

export interface WrapRow {
  /** The throwaway key kind, or the vault key's label. */
  key: string;
  /** true: the token let it out (under `mechanism`). */
  wrapped: boolean;
  mechanism?: string;
  /** Each mechanism tried and its answer. */
  answers: string[];
}

export interface CapabilityReport {
  module: { path: string; library: string; libraryVersion: string; manufacturer: string; cryptoki: string; libraryParameters: boolean };
  token: { label: string; manufacturer: string; model: string; serial: string; firmware: string };
  mechanisms: MechanismRow[];
  checks: CheckRow[];
  quirks: ModuleQuirks;
  wrap: {
    /** Never-extractable session keys like the vault's, wrapped under a session key. */
    throwaway: WrapRow[];
    /** The vault's own keys on the token, when present. */
    vaultKeys: WrapRow[];
    /** Some key that must never leave the token could be wrapped out. */
    wrappable: boolean;
  };
  /** Required capabilities this module or token lacks, named: init and start refuse when non-empty. */
  missing: string[];
}

const ok = (code: number) => code === 0;
const answer = (code: number) => (code === -1 ? 'a native error' : ckrText(code));
const PROBE_APP = 'bkv.probe';
const PROBE_ID = 'bkv.probe.anchor';

/** The capability check, on an open token. `vaultKeys`: also try to wrap the vault keys present. */
export function inspectToken(token: Token, cfg: Pick<TokenConfig, 'modulePath' | 'libraryParameters'>, o: { vaultKeys?: boolean } = {}): CapabilityReport {
  const d = token.describe();
  const mechanisms = mechanismNeeds().map((need) => mechanismRow(token, need));
  const has = (name: string) => mechanisms.some((m) => m.name === name && !m.problem);
  const checks: CheckRow[] = [];
  const check = (name: string, code: number, detail: string, required = true): boolean => {
    checks.push({ name, ok: ok(code), answer: answer(code), detail, required });
    return ok(code);
  };
  const made: Handle[] = [];
  const keep = <H extends Handle>(h: H): H => (made.push(h), h);
  const quirks: ModuleQuirks = { ...DEFAULT_QUIRKS };
  const wrap: CapabilityReport['wrap'] = { throwaway: [], vaultKeys: [], wrappable: false };
  try {
    cleanStale(token);

    // Key templates: the vault's own, then without the false usage flags some modules reject.
    let ec: { priv: Handle; pub: Handle } | undefined;
    if (has('CKM_EC_KEY_PAIR_GEN')) {
      let code = token.attempt(() => (ec = token.generateEcKeyPair('bkv.probe.ec', ['derive'], undefined, { session: true, template: 'full' })));
      if (!ok(code)) {
        const minimal = token.attempt(() => (ec = token.generateEcKeyPair('bkv.probe.ec', ['derive'], undefined, { session: true, template: 'minimal' })));
        if (ok(minimal)) quirks.template = 'minimal';
        check(
          'template.ec',
          minimal,
          ok(minimal)
            ? `the full EC template was refused (${answer(code)}); one without the false usage flags works, so the vault leaves them out`
            : `EC key generation refused with the full template (${answer(code)}) and a minimal one`,
        );
        code = minimal;
      } else check('template.ec', code, 'P-256 key pair with the vault\'s template (every usage flag stated)');
      if (ec) {
        keep(ec.priv);
        keep(ec.pub);
        if (has('CKM_ECDH1_DERIVE')) check('ecdh', token.attempt(() => token.ecdhX(ec!.priv, token.ecPoint(ec!.pub))), 'raw ECDH (CKD_NULL) into a session secret, x-coordinate read once');
      }
    }
    if (has('CKM_EC_KEY_PAIR_GEN') && has('CKM_ECDSA')) {
      let sig: { priv: Handle; pub: Handle } | undefined;
      const code = token.attempt(() => (sig = token.generateEcKeyPair('bkv.probe.sig', ['sign'], undefined, { session: true })));
      if (sig) {
        keep(sig.priv);
        keep(sig.pub);
        check('ecdsa', token.attempt(() => token.ecdsaSign(sig!.priv, Buffer.alloc(32, 1))), 'ECDSA over a 32-byte digest');
      } else check('ecdsa', code, 'P-256 signing key pair');
    }

    // Can a token key be made open for cloning, with the attributes the policy's open phase reads back?
    if (has('CKM_EC_KEY_PAIR_GEN')) {
      const kx = KEY_SET.find((k) => k.name === 'kx')!;
      let open: { priv: Handle; pub: Handle } | undefined;
      const code = token.attempt(() => (open = token.generateEcKeyPair('bkv.probe.open', kx.usages, protectionFor(kx, 'open'))));
      let why = `refused: ${answer(code)}`;
      if (open) {
        const o = open;
        try {
          const rule = phaseOf(kx, token.attributes(o.priv));
          if (rule?.phase === 'open') why = '';
          else {
            const a = token.attributes(o.priv);
            why = `made, but reads back as CKA_LOCAL=${a.local}, CKA_ALLOWED_MECHANISMS=[${a.allowedMechanisms.join(' ')}], CKA_WRAP_WITH_TRUSTED=${a.wrapWithTrusted}`;
          }
        } finally {
          token.attempt(() => token.destroy(o.priv));
          token.attempt(() => token.destroy(o.pub));
        }
      }
      quirks.keyPhase = why ? 'not-cloneable' : 'open';
      checks.push({
        name: 'keys.open-phase',
        ok: !why,
        answer: answer(code),
        detail: why
          ? `a token key open for cloning (extractable only under a trusted key, CKA_ALLOWED_MECHANISMS) is ${why}: new keys are made never-extractable ("not cloneable"), so this vault cannot join a cohort by the key ceremony`
          : 'token keys can be made open for cloning (the key ceremony can copy them to a trusted HSM)',
        required: false,
      });
    }

    // HMAC: sign, and what a wrong MAC gets from C_Verify.
    let hmac: Handle | undefined;
    if (has('CKM_GENERIC_SECRET_KEY_GEN') && has('CKM_SHA256_HMAC')) {
      const code = token.attempt(() => (hmac = keep(token.generateSecretKey('bkv.probe.hmac', 'generic', 32, ['sign', 'verify'], undefined, { session: true }))));
      if (hmac) {
        const data = Buffer.from('bkv capability check');
        const signed = check('hmac.sign', token.attempt(() => token.hmacSha256(hmac!, data)), 'HMAC-SHA256 with C_Sign');
        if (signed) {
          const right = token.hmacSha256(hmac, data);
          const wrong = Buffer.from(right);
          wrong[0] = wrong[0]! ^ 1;
          const mismatch = token.verifyMismatchCode(hmac, data, wrong);
          const match = token.verifyMismatchCode(hmac, data, right);
          if (mismatch === CKR.SIGNATURE_INVALID && match === 0) {
            quirks.verify = 'verify';
            check('hmac.verify-mismatch', 0, 'a wrong MAC gets CKR_SIGNATURE_INVALID: verifiers are compared inside the token (C_Verify)', false);
          } else {
            quirks.verify = 'sign-compare';
            checks.push({
              name: 'hmac.verify-mismatch',
              ok: true,
              answer: answer(mismatch),
              detail:
                `a wrong MAC gets ${answer(mismatch)}${match !== 0 ? ` and a right one ${answer(match)}` : ''}, not CKR_SIGNATURE_INVALID: ` +
                'the vault computes the HMAC in the token (C_Sign) and compares in constant time, so a wrong password stays a counted guess',
              required: false,
            });
          }
        }
      } else check('hmac.sign', code, 'generic secret key for HMAC-SHA256');
    }

    // AES-GCM round trip.
    if (has('CKM_AES_KEY_GEN') && has('CKM_AES_GCM')) {
      let aes: Handle | undefined;
      const code = token.attempt(() => (aes = keep(token.generateSecretKey('bkv.probe.aes', 'aes', 32, ['encrypt', 'decrypt'], undefined, { session: true }))));
      if (aes) {
        const iv = Buffer.alloc(12, 7);
        const aad = Buffer.from('aad');
        let back: Buffer | null = null;
        const c = token.attempt(() => (back = token.aesGcmDecrypt(aes!, iv, aad, token.aesGcmEncrypt(aes!, iv, aad, Buffer.from('probe')))));
        check('aes-gcm', c !== 0 ? c : back && (back as Buffer).toString() === 'probe' ? 0 : CKR.GENERAL_ERROR, 'AES-256-GCM seal and open, 96-bit IV, 128-bit tag');
      } else check('aes-gcm', code, 'AES-256 session key');
    }

    // The state anchor: a token data object, else the label of a dedicated secret key.
    const data = token.tryDataObject(PROBE_APP);
    if (ok(data)) {
      quirks.anchor = 'data';
      check('anchor.data-object', 0, 'private token CKO_DATA objects hold the state anchor');
    } else {
      quirks.anchor = 'key';
      checks.push({
        name: 'anchor.data-object',
        ok: false,
        answer: answer(data),
        detail: 'the token refuses private token CKO_DATA objects: the anchor lives in the labels of two usage-less AES keys instead',
        required: false,
      });
    }
    check('anchor.label-write', labelWrite(token, quirks.anchor), `the anchor's label can be rewritten in place (${quirks.anchor === 'data' ? 'data object' : 'secret key'})`);

    // Can keys that must never leave the token be wrapped out?
    // Every AES wrapping mechanism the module lists: one that lets a key out is enough.
    const wrapMechs = (['aes-key-wrap-pad', 'aes-key-wrap', 'aes-cbc-pad'] as const).filter((m) => token.mechanismInfo(MECH_NAME[m]!) !== undefined);
    let wrapping: Handle | undefined;
    if (wrapMechs.length && has('CKM_AES_KEY_GEN')) {
      const code = token.attempt(() => (wrapping = keep(token.sessionWrappingKey())));
      if (!wrapping) check('wrap.session-key', code, 'a session AES key to try wrapping with', false);
    }
    if (wrapping) {
      const w = wrapping;
      const attemptWrap = (key: string, h: Handle): WrapRow => {
        const answers: string[] = [];
        for (const m of wrapMechs) {
          const code = token.tryWrap(w, h, m);
          answers.push(`${MECH_NAME[m]}: ${answer(code)}`);
          if (code === 0) return { key, wrapped: true, mechanism: MECH_NAME[m], answers };
        }
        return { key, wrapped: false, answers };
      };
      const throwaway: [string, Handle | undefined][] = [['P-256 private key (like bkv.kx)', ec?.priv], ['HMAC key (like bkv.verifier)', hmac]];
      let aesKey: Handle | undefined;
      token.attempt(() => (aesKey = keep(token.generateSecretKey('bkv.probe.aes2', 'aes', 32, ['encrypt', 'decrypt'], undefined, { session: true }))));
      throwaway.push(['AES-256 key (like bkv.seal)', aesKey]);
      for (const [k, h] of throwaway) if (h) wrap.throwaway.push(attemptWrap(`never-extractable ${k}`, h));
      if (o.vaultKeys) {
        for (const spec of KEY_SET) {
          const found = spec.perEpoch ? token.listLabels('secret', spec.label).map((x) => ({ label: x.label, handle: x.handle })) : token.find(spec.kind === 'ec-p256' ? 'private' : 'secret', spec.label).map((handle) => ({ label: spec.label, handle }));
          for (const f of found) wrap.vaultKeys.push(attemptWrap(f.label, f.handle));
        }
      }
      wrap.wrappable = [...wrap.throwaway, ...wrap.vaultKeys].some((r) => r.wrapped);
    }
  } finally {
    for (const h of made.reverse()) token.attempt(() => token.destroy(h));
  }

  const missing = [
    ...mechanisms.filter((m) => m.required && m.problem).map((m) => `${m.name} (${m.problem})`),
    ...checks.filter((c) => c.required && !c.ok).map((c) => `${c.name}: ${c.answer}`),
  ];
  return {
    module: { path: cfg.modulePath, library: d.library, libraryVersion: d.libraryVersion, manufacturer: d.manufacturer, cryptoki: d.cryptoki, libraryParameters: !!cfg.libraryParameters },
    token: { label: token.label, ...d.token },
    mechanisms,
    checks,
    quirks,
    wrap,
    missing,
  };
}

const MECH_NAME: Record<string, string> = { 'aes-key-wrap-pad': 'CKM_AES_KEY_WRAP_PAD', 'aes-key-wrap': 'CKM_AES_KEY_WRAP', 'aes-cbc-pad': 'CKM_AES_CBC_PAD' };

function mechanismRow(token: Token, need: MechanismNeed): MechanismRow {
  const info = token.mechanismInfo(need.name);
  if (!info) return { name: need.name, required: need.required, purpose: need.purpose, present: false, flags: [], problem: 'not supported by this module' };
  const flags = flagNames(info.flags);
  const lacking = need.flags.filter((f) => !flags.includes(f));
  const size = need.keySize;
  const inRange = (n: number) => info.minKeySize <= n && n <= info.maxKeySize;
  const sizeOk = !size || inRange(size.bits) || (size.bytes !== undefined && inRange(size.bytes));
  const problems = [...(lacking.length ? [`lacks ${lacking.join(', ')}`] : []), ...(sizeOk ? [] : [`key sizes ${info.minKeySize}..${info.maxKeySize} exclude ${size!.bits} bits`])];
  return {
    name: need.name,
    required: need.required,
    purpose: need.purpose,
    present: true,
    minKeySize: info.minKeySize,
    maxKeySize: info.maxKeySize,
    flags,
    ...(problems.length ? { problem: problems.join('; ') } : {}),
  };
}

/** Make an anchor-shaped token object, rewrite its label, read it back, destroy it: 0 when all worked. */
function labelWrite(token: Token, mode: ModuleQuirks['anchor']): number {
  let h: Handle | undefined;
  try {
    const code = token.attempt(() => {
      h = mode === 'data' ? token.createData(PROBE_APP, 'bkv.probe 0', Buffer.from('probe')) : token.createAnchorKey(PROBE_ID, 'bkv.probe 0');
      token.setLabel(h, 'bkv.probe 1');
      if (token.readLabel(h) !== 'bkv.probe 1') throw Object.assign(new Error('CKR_GENERAL_ERROR:5'), { code: CKR.GENERAL_ERROR });
    });
    return code;
  } finally {
    if (h) token.attempt(() => token.destroy(h!));
  }
}

/** Token objects a crashed check may have left behind. */
function cleanStale(token: Token): void {
  token.attempt(() => {
    for (const h of token.findData(PROBE_APP)) token.destroy(h);
  });
  token.attempt(() => {
    for (const h of token.findKeyById(PROBE_ID)) token.destroy(h);
  });
  for (const cls of ['private', 'public'] as const) {
    token.attempt(() => {
      for (const h of token.find(cls, 'bkv.probe.open')) token.destroy(h);
    });
  }
}

/** Open the token, run the check, close it. */
export function inspectModule(cfg: TokenConfig, o: { vaultKeys?: boolean } = {}): CapabilityReport {
  const token = Token.open(cfg);
  try {
    return inspectToken(token, cfg, o);
  } finally {
    token.close();
  }
}

// ---- quirks for the vault's own opens -------------------------------------------

const learned = new Map<string, ModuleQuirks>();

/**
 * The quirks of this module and token, measured once per process (the check
 * makes a few throwaway objects). Every path that opens the vault's keys calls
 * this, so a token is always driven the way its module needs.
 */
export function quirksOf(token: Token, cfg: Pick<TokenConfig, 'modulePath' | 'libraryParameters' | 'tokenLabel'>): ModuleQuirks {
  const key = `${cfg.modulePath}\0${cfg.tokenLabel}`;
  let q = learned.get(key);
  if (!q) {
    q = inspectToken(token, cfg).quirks;
    learned.set(key, q);
  }
  return q;
}

/** Remember a check's quirks (a start that ran the full check need not measure again). */
export function rememberQuirks(cfg: Pick<TokenConfig, 'modulePath' | 'tokenLabel'>, q: ModuleQuirks): void {
  learned.set(`${cfg.modulePath}\0${cfg.tokenLabel}`, q);
}

/** The known quirks for a config, if measured in this process. */
export function knownQuirks(cfg: Pick<TokenConfig, 'modulePath' | 'tokenLabel'>): ModuleQuirks | undefined {
  return learned.get(`${cfg.modulePath}\0${cfg.tokenLabel}`);
}

// ---- refusals ---------------------------------------------------------------------

/** Refuse (HSM_ERROR, detail.missing) when a required capability is missing, naming each. */
export function requireCapabilities(r: CapabilityReport, what: string): void {
  if (r.missing.length === 0) return;
  throw new VaultError(
    ErrorCodes.HSM_ERROR,
    `${what}: this PKCS#11 module (${r.module.library} ${r.module.libraryVersion}, token "${r.token.label}") lacks what the vault needs: ${r.missing.join('; ')}. ` +
      'Nothing was created. "bkv-admin hsm check" prints the full table; docs/OPERATIONS.md lists known modules.',
    { missing: r.missing.join("; ") },
  );
}

/** Refuse to serve keys the module lets out wrapped, unless the operator accepted that. */
export function requireUnwrappable(r: CapabilityReport, accepted: boolean, what: string): void {
  if (!r.wrap.wrappable || accepted) return;
  const rows = [...r.wrap.vaultKeys, ...r.wrap.throwaway].filter((w) => w.wrapped).map((w) => `${w.key} (${w.mechanism})`);
  throw new VaultError(
    ErrorCodes.HSM_POLICY_VIOLATION,
    `${what}: this module lets keys marked never-extractable leave the token wrapped: ${rows.join(', ')}. ` +
      'Anyone with the PIN could then copy the OPRF and seal keys and guess passwords offline, without the attempt limit. ' +
      'Use an HSM that enforces CKA_EXTRACTABLE, or accept this explicitly with hsm.acceptWrappableKeys: true (BKV_HSM_ACCEPT_WRAPPABLE_KEYS=1); status and metrics will show it.',
    { wrappable: true },
  );
}

/** What the status line says about a check's wrap result. */
export function wrapSummary(r: CapabilityReport | undefined, accepted: boolean): { wrappable: boolean; accepted: boolean; keys: string[] } | undefined {
  if (!r) return undefined;
  return { wrappable: r.wrap.wrappable, accepted: r.wrap.wrappable && accepted, keys: [...r.wrap.vaultKeys, ...r.wrap.throwaway].filter((w) => w.wrapped).map((w) => w.key) };
}
