// What a PKCS#11 module answers to every call the vault makes, with the vault's
// own templates (mirrored from vault/hsm/token.ts), plus the candidates for
// what the vault cannot do there: the facts behind "any PKCS#11 HSM".
//
//   npx tsx scripts/probe-pkcs11.ts --module PATH [--params STRING] --token LABEL --pin PIN
//       [--so-pin PIN] [--derives N] [--rates-ms N] [--rsa-bits N] [--skip-wrong-pin] [--json FILE]
//   npx tsx scripts/probe-pkcs11.ts --temp softhsm|nss [options]   a throwaway test token
//   npx tsx scripts/probe-pkcs11.ts --compare A.json B.json ...   results side by side
//
// Prints a Markdown table: call, template/mechanism, result (CKR name + hex), notes.
// It writes token objects labelled "probe.<run>.*" and destroys them at the end;
// it tries one wrong PIN unless --skip-wrong-pin (real HSMs count wrong PINs).
// Uses pkcs11js directly on purpose: it must see raw return codes, not the
// vault's mapping of them.
import pkcs11js from 'pkcs11js';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { ckrOf } from '../vault/hsm/ckr.js';
import { mechanismNames, type KeyAttributes } from '../vault/hsm/token.js';
import { violations } from '../hsm-policy/enforce.js';
import { KEY_SET, type KeySpec } from '../hsm-policy/policy.js';

const P = pkcs11js;
type Handle = Buffer;
type Attr = pkcs11js.Attribute;

// ---- arguments ----------------------------------------------------------------

const argv = process.argv.slice(2);
const opt = (name: string): string | undefined => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : undefined;
};
const flag = (name: string): boolean => argv.includes(`--${name}`);
const num = (name: string, dflt: number): number => Number(opt(name) ?? dflt);

// ---- names --------------------------------------------------------------------

// Codes pkcs11js does not export (PKCS#11 2.40 additions) and NSS's vendor codes.
const EXTRA_CKR: Record<number, string> = {
  0x1b: 'CKR_ACTION_PROHIBITED',
  0x115: 'CKR_CURVE_NOT_SUPPORTED',
  0xce534351: 'CKR_NSS_CERTDB_FAILED',
  0xce534352: 'CKR_NSS_KEYDB_FAILED',
};
const names = (prefix: string): Map<number, string> => {
  const m = new Map<number, string>();
  for (const [k, v] of Object.entries(P)) if (k.startsWith(prefix) && typeof v === 'number' && !m.has(v)) m.set(v, k);
  return m;
};
const CKR_NAMES = names('CKR_');
const CKA_NAMES = names('CKA_');

function ckrText(code: number): string {
  const name = CKR_NAMES.get(code) ?? EXTRA_CKR[code] ?? (code >= 0x80000000 ? 'CKR_VENDOR_DEFINED' : 'CKR_?');
  return `${name} (0x${code.toString(16)})`;
}

function failure(e: unknown): string {
  const code = ckrOf(e);
  return code === undefined ? `error: ${(e as Error).message}` : ckrText(code);
}

/** 0 when fn returns, else the CKR code (-1 for a non-PKCS#11 error). */
function codeOf(fn: () => unknown): number {
  try {
    fn();
    return 0;
  } catch (e) {
    return ckrOf(e) ?? -1;
  }
}
const codeText = (c: number): string => (c === 0 ? 'OK' : c === -1 ? 'error' : ckrText(c));

// ---- results ------------------------------------------------------------------

interface Row {
  id: string;
  section: string;
  call: string;
  detail: string;
  result: string;
  notes: string;
}
const rows: Row[] = [];
let section = '';

/** Run one probe step and record it; fn's return value becomes the notes. */
function step(id: string, call: string, detail: string, fn: () => string | void): boolean {
  try {
    const notes = fn() ?? '';
    rows.push({ id, section, call, detail, result: 'OK', notes });
    return true;
  } catch (e) {
    const extra = (e as { probeNote?: string }).probeNote ?? '';
    rows.push({ id, section, call, detail, result: failure(e), notes: extra });
    return false;
  }
}
/** Record a fact that is not one call's result. */
const note = (id: string, call: string, detail: string, result: string, notes = ''): void => {
  rows.push({ id, section, call, detail, result, notes });
};

function withNote(e: unknown, probeNote: string): unknown {
  if (e instanceof Error) Object.assign(e, { probeNote });
  return e;
}

// ---- templates (mirrors of vault/hsm/token.ts; keep them in step) ------------

type Usage = 'derive' | 'sign' | 'verify' | 'encrypt' | 'decrypt';
const USAGE_ATTR: Record<Usage, number> = {
  derive: P.CKA_DERIVE,
  sign: P.CKA_SIGN,
  verify: P.CKA_VERIFY,
  encrypt: P.CKA_ENCRYPT,
  decrypt: P.CKA_DECRYPT,
};
const P256_OID = Buffer.from('06082a8648ce3d030107', 'hex');
/** NSS's vendor attribute for a private key's public value (pkcs11n.h CKA_NSS_DB). */
const CKA_NSS_DB = 0xd5a0db00;

function usageTemplate(usages: Usage[], cls: 'private' | 'secret'): Attr[] {
  const known: Usage[] = cls === 'private' ? ['derive', 'sign', 'decrypt'] : ['derive', 'sign', 'verify', 'encrypt', 'decrypt'];
  const attrs: Attr[] = known.map((u) => ({ type: USAGE_ATTR[u], value: usages.includes(u) }));
  attrs.push({ type: P.CKA_UNWRAP, value: false });
  if (cls === 'secret') attrs.push({ type: P.CKA_WRAP, value: false });
  return attrs;
}

const ecPublicTemplate = (label: string, usages: Usage[]): Attr[] => [
  { type: P.CKA_TOKEN, value: true },
  { type: P.CKA_PRIVATE, value: false },
  { type: P.CKA_LABEL, value: label },
  { type: P.CKA_EC_PARAMS, value: P256_OID },
  { type: P.CKA_VERIFY, value: usages.includes('sign') },
  { type: P.CKA_MODIFIABLE, value: false },
];
const ecPrivateTemplate = (label: string, usages: Usage[]): Attr[] => [
  { type: P.CKA_TOKEN, value: true },
  { type: P.CKA_PRIVATE, value: true },
  { type: P.CKA_SENSITIVE, value: true },
  { type: P.CKA_EXTRACTABLE, value: false },
  { type: P.CKA_MODIFIABLE, value: false },
  { type: P.CKA_LABEL, value: label },
  ...usageTemplate(usages, 'private'),
];
const secretTemplate = (label: string, kind: 'aes' | 'generic', bytes: number, usages: Usage[]): Attr[] => [
  { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
  { type: P.CKA_KEY_TYPE, value: kind === 'aes' ? P.CKK_AES : P.CKK_GENERIC_SECRET },
  { type: P.CKA_TOKEN, value: true },
  { type: P.CKA_PRIVATE, value: true },
  { type: P.CKA_SENSITIVE, value: true },
  { type: P.CKA_EXTRACTABLE, value: false },
  { type: P.CKA_MODIFIABLE, value: false },
  { type: P.CKA_LABEL, value: label },
  { type: P.CKA_VALUE_LEN, value: bytes },
  ...usageTemplate(usages, 'secret'),
];
const ECDH_TEMPLATE: Attr[] = [
  { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
  { type: P.CKA_KEY_TYPE, value: P.CKK_GENERIC_SECRET },
  { type: P.CKA_TOKEN, value: false },
  { type: P.CKA_SENSITIVE, value: false },
  { type: P.CKA_EXTRACTABLE, value: true },
  { type: P.CKA_VALUE_LEN, value: 32 },
];
const dataTemplate = (application: string, label: string, value: Buffer): Attr[] => [
  { type: P.CKA_CLASS, value: P.CKO_DATA },
  { type: P.CKA_TOKEN, value: true },
  { type: P.CKA_PRIVATE, value: true },
  { type: P.CKA_MODIFIABLE, value: true },
  { type: P.CKA_APPLICATION, value: application },
  { type: P.CKA_LABEL, value: label },
  { type: P.CKA_VALUE, value },
];
const SESSION_WRAP_TEMPLATE: Attr[] = [
  { type: P.CKA_TOKEN, value: false },
  { type: P.CKA_VALUE_LEN, value: 32 },
  { type: P.CKA_WRAP, value: true },
  { type: P.CKA_UNWRAP, value: true },
];
const gcm = (iv: Buffer, aad: Buffer): pkcs11js.Mechanism => ({
  mechanism: P.CKM_AES_GCM,
  parameter: { type: P.CK_PARAMS_AES_GCM_v240, iv, ivBits: iv.length * 8, aad, tagBits: 128 } as unknown as pkcs11js.IParams,
});
const ecdh = (point: Uint8Array): pkcs11js.Mechanism => ({
  mechanism: P.CKM_ECDH1_DERIVE,
  parameter: { type: P.CK_PARAMS_EC_DH, kdf: P.CKD_NULL, publicData: Buffer.from(point) } as pkcs11js.ECDH1,
});
const oaep = (hash: 'sha1' | 'sha256'): pkcs11js.Mechanism => ({
  mechanism: P.CKM_RSA_PKCS_OAEP,
  parameter: {
    type: P.CK_PARAMS_RSA_OAEP,
    hashAlg: hash === 'sha1' ? P.CKM_SHA_1 : P.CKM_SHA256,
    mgf: hash === 'sha1' ? P.CKG_MGF1_SHA1 : P.CKG_MGF1_SHA256,
    source: 1, // CKZ_DATA_SPECIFIED, empty label
  } as pkcs11js.RsaOAEP,
});
const WRAP_PAD: pkcs11js.Mechanism = { mechanism: P.CKM_AES_KEY_WRAP_PAD };

/**
 * Which attributes, left out, make a refused template pass: every single one that
 * does, else the first pair that does (a template can be refused for two reasons).
 */
function blame(templates: Attr[][], attempt: (t: Attr[][]) => void): { attrs: Attr[]; both: boolean } | undefined {
  const all = templates.flatMap((t, which) => t.map((a) => ({ a, which })));
  const without = (drop: Attr[]): Attr[][] => templates.map((t) => t.filter((a) => !drop.includes(a)));
  const singles = all.filter(({ a }) => codeOf(() => attempt(without([a]))) === 0).map(({ a }) => a);
  if (singles.length) return { attrs: singles, both: false };
  for (let i = 0; i < all.length; i++) {
    for (let j = i + 1; j < all.length; j++) {
      const pair = [all[i]!.a, all[j]!.a];
      if (codeOf(() => attempt(without(pair))) === 0) return { attrs: pair, both: true };
    }
  }
  return undefined;
}
const attrText = (a: Attr): string => `${CKA_NAMES.get(a.type) ?? a.type}=${Buffer.isBuffer(a.value) ? a.value.toString('hex') : String(a.value)}`;

function culprits(templates: Attr[][], attempt: (t: Attr[][]) => void): string {
  const found = blame(templates, attempt);
  if (!found) return 'no single attribute or pair is to blame';
  const where = (a: Attr): string => (templates.length > 1 ? (templates[0]!.includes(a) ? ' (public)' : ' (private)') : '');
  // Singles: leaving out any one of them is enough. A pair: both must go.
  return `passes without ${found.attrs.map((a) => attrText(a) + where(a)).join(found.both ? ' and ' : ' or without ')}`;
}

// ---- the module ----------------------------------------------------------------

interface Target {
  module: string;
  params?: string;
  token: string;
  pin: string;
  soPin?: string;
}

class Module {
  readonly p11 = new P.PKCS11();
  slot!: Handle;
  constructor(readonly t: Target) {
    this.p11.load(t.module);
  }
  /** C_Initialize with the target's library parameters, or with none when `bare`. */
  init(bare = false): void {
    const params = bare ? undefined : this.t.params;
    this.p11.C_Initialize(params ? { libraryParameters: params, flags: P.CKF_OS_LOCKING_OK } : { flags: P.CKF_OS_LOCKING_OK });
  }
  findSlot(): Handle {
    for (const s of this.p11.C_GetSlotList(true)) {
      try {
        if (this.p11.C_GetTokenInfo(s).label.trim() === this.t.token) return (this.slot = s);
      } catch {
        /* a listed slot without a token (NSS after a slot was unloaded) */
      }
    }
    throw new Error(`no token labelled "${this.t.token}"`);
  }
  open(): Handle {
    return this.p11.C_OpenSession(this.slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
  }
  /** A logged-in session; "already logged in" is success (login is per token). */
  session(): Handle {
    const s = this.open();
    const c = codeOf(() => this.p11.C_Login(s, P.CKU_USER, this.t.pin));
    if (c !== 0 && c !== P.CKR_USER_ALREADY_LOGGED_IN) throw new Error(`login failed: ${codeText(c)}`);
    return s;
  }
  find(s: Handle, template: Attr[]): Handle[] {
    this.p11.C_FindObjectsInit(s, template);
    try {
      const out: Handle[] = [];
      for (;;) {
        const batch = this.p11.C_FindObjects(s, 64);
        if (batch.length === 0) return out;
        out.push(...batch);
      }
    } finally {
      this.p11.C_FindObjectsFinal(s);
    }
  }
  read(s: Handle, h: Handle, type: number): Buffer | undefined {
    const [a] = this.p11.C_GetAttributeValue(s, h, [{ type }]);
    return a?.value;
  }
  /** A bool attribute as "true"/"false", or the refusal's code name. */
  boolText(s: Handle, h: Handle, type: number): string {
    try {
      const v = this.read(s, h, type);
      return v === undefined || v.length === 0 ? 'empty' : String(v[0] !== 0);
    } catch (e) {
      return failure(e);
    }
  }
  /** The attributes vault/hsm/token.ts attributes() decodes, decoded the same way. */
  keyAttributes(s: Handle, h: Handle): KeyAttributes {
    const read = (type: number): Buffer | undefined => {
      try {
        return this.read(s, h, type);
      } catch {
        return undefined;
      }
    };
    const bool = (type: number): boolean => {
      const v = read(type);
      return v !== undefined && v.length > 0 && v[0] !== 0;
    };
    const ulong = (type: number): number => {
      const v = read(type);
      if (!v || v.length === 0) return 0;
      return v.length >= 8 ? Number(v.readBigUInt64LE(0)) : v.readUInt32LE(0);
    };
    const kt = ulong(P.CKA_KEY_TYPE);
    return {
      label: read(P.CKA_LABEL)?.toString('utf8') ?? '',
      keyType: kt === P.CKK_EC ? 'ec' : kt === P.CKK_AES ? 'aes' : kt === P.CKK_GENERIC_SECRET ? 'generic' : 'other',
      token: bool(P.CKA_TOKEN),
      private: bool(P.CKA_PRIVATE),
      sensitive: bool(P.CKA_SENSITIVE),
      extractable: bool(P.CKA_EXTRACTABLE),
      alwaysSensitive: bool(P.CKA_ALWAYS_SENSITIVE),
      neverExtractable: bool(P.CKA_NEVER_EXTRACTABLE),
      modifiable: bool(P.CKA_MODIFIABLE),
      derive: bool(P.CKA_DERIVE),
      sign: bool(P.CKA_SIGN),
      verify: bool(P.CKA_VERIFY),
      encrypt: bool(P.CKA_ENCRYPT),
      decrypt: bool(P.CKA_DECRYPT),
      wrap: bool(P.CKA_WRAP),
      unwrap: bool(P.CKA_UNWRAP),
      valueLen: ulong(P.CKA_VALUE_LEN),
      ecParams: read(P.CKA_EC_PARAMS) ?? Buffer.alloc(0),
      wrapWithTrusted: bool(P.CKA_WRAP_WITH_TRUSTED),
      local: bool(P.CKA_LOCAL),
      trusted: bool(P.CKA_TRUSTED),
      allowedMechanisms: mechanismNames(read(P.CKA_ALLOWED_MECHANISMS)),
    };
  }
}

/** RSS after a garbage collection when node runs with --expose-gc (NODE_OPTIONS=--expose-gc). */
const rss = (): number => {
  (globalThis as { gc?: () => void }).gc?.();
  return process.memoryUsage().rss;
};
const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;

/** Calls per second of fn over about `ms` milliseconds (at least 3 calls). */
function rate(ms: number, fn: () => void): string {
  let n = 0;
  const t0 = performance.now();
  while (n < 3 || performance.now() - t0 < ms) {
    fn();
    n++;
  }
  return `${Math.round((n * 1000) / (performance.now() - t0))}/s`;
}

const flagNames = (flags: number, table: [number, string][]): string =>
  table.filter(([bit]) => (flags & bit) !== 0).map(([, n]) => n).join('|') || '0';
const TOKEN_FLAGS: [number, string][] = [
  [P.CKF_RNG, 'RNG'],
  [P.CKF_WRITE_PROTECTED, 'WRITE_PROTECTED'],
  [P.CKF_LOGIN_REQUIRED, 'LOGIN_REQUIRED'],
  [P.CKF_USER_PIN_INITIALIZED, 'USER_PIN_INITIALIZED'],
  [P.CKF_TOKEN_INITIALIZED, 'TOKEN_INITIALIZED'],
  [P.CKF_SO_PIN_LOCKED, 'SO_PIN_LOCKED'],
  [P.CKF_USER_PIN_LOCKED, 'USER_PIN_LOCKED'],
];
const MECH_FLAGS: [number, string][] = [
  [P.CKF_HW, 'HW'],
  [P.CKF_ENCRYPT, 'ENCRYPT'],
  [P.CKF_DECRYPT, 'DECRYPT'],
  [P.CKF_DIGEST, 'DIGEST'],
  [P.CKF_SIGN, 'SIGN'],
  [P.CKF_VERIFY, 'VERIFY'],
  [P.CKF_GENERATE, 'GENERATE'],
  [P.CKF_GENERATE_KEY_PAIR, 'GENERATE_KEY_PAIR'],
  [P.CKF_WRAP, 'WRAP'],
  [P.CKF_UNWRAP, 'UNWRAP'],
  [P.CKF_DERIVE, 'DERIVE'],
  [0x00100000, 'EC_F_P'], // CKF_EC_F_P and the next two: not exported by pkcs11js
  [0x00800000, 'EC_NAMEDCURVE'],
  [0x01000000, 'EC_UNCOMPRESS'],
];
const MECHANISMS = [
  'CKM_EC_KEY_PAIR_GEN',
  'CKM_ECDH1_DERIVE',
  'CKM_ECDSA',
  'CKM_SHA256_HMAC',
  'CKM_GENERIC_SECRET_KEY_GEN',
  'CKM_AES_KEY_GEN',
  'CKM_AES_GCM',
  'CKM_AES_KEY_WRAP',
  'CKM_AES_KEY_WRAP_PAD',
  'CKM_RSA_PKCS_KEY_PAIR_GEN',
  'CKM_RSA_PKCS_OAEP',
] as const;

const spec = (name: KeySpec['name']): KeySpec => KEY_SET.find((k) => k.name === name)!;

// ---- child modes (another process reads or writes an anchor label) -----------

function childMode(kind: string, target: Target): void {
  const m = new Module(target);
  m.init();
  m.findSlot();
  const s = m.session();
  const id = Buffer.from(opt('id') ?? '', 'hex');
  const [h] = m.find(s, [
    { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
    { type: P.CKA_TOKEN, value: true },
    { type: P.CKA_ID, value: id },
  ]);
  if (!h) throw new Error('anchor object not found');
  if (kind === 'write-label') m.p11.C_SetAttributeValue(s, h, [{ type: P.CKA_LABEL, value: opt('label') ?? '' }]);
  console.log(JSON.stringify({ label: m.read(s, h, P.CKA_LABEL)?.toString('utf8') ?? '' }));
  m.p11.C_CloseSession(s);
  m.p11.C_Finalize();
}

function child(target: Target, args: string[]): string {
  const base = ['--module', target.module, '--token', target.token, '--pin', target.pin, ...(target.params ? ['--params', target.params] : [])];
  const r = spawnSync(process.execPath, [...process.execArgv, process.argv[1]!, ...base, ...args], { encoding: 'utf8', env: process.env });
  if (r.status !== 0) throw new Error(`child failed: ${r.stderr.trim().split('\n').slice(-3).join(' ')}`);
  return (JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { label: string }).label;
}

// ---- a fresh thread: is the verify-mismatch code stable? -------------------------

// Runs in a worker_thread, i.e. on a fresh OS thread: a module that reports the
// thread's last internal error for a mismatch (NSS does) shows it here.
const MISMATCH_WORKER = `
const { parentPort, workerData: w } = require('node:worker_threads');
const P = require(w.pkcs11);
const p = new P.PKCS11();
p.load(w.module);
const code = (f) => { try { f(); return 0; } catch (e) { return typeof e.code === 'number' ? e.code : -1; } };
code(() => p.C_Initialize(w.params ? { libraryParameters: w.params, flags: P.CKF_OS_LOCKING_OK } : { flags: P.CKF_OS_LOCKING_OK }));
const slot = p.C_GetSlotList(true).find((x) => { try { return p.C_GetTokenInfo(x).label.trim() === w.token; } catch { return false; } });
const s = p.C_OpenSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
code(() => p.C_Login(s, P.CKU_USER, w.pin));
const find = (cls, label) => { p.C_FindObjectsInit(s, [{ type: P.CKA_CLASS, value: cls }, { type: P.CKA_LABEL, value: label }]); const [h] = p.C_FindObjects(s, 1); p.C_FindObjectsFinal(s); return h; };
const ver = find(P.CKO_SECRET_KEY, w.verifier), kx = find(P.CKO_PRIVATE_KEY, w.kx), seal = find(P.CKO_SECRET_KEY, w.seal);
const data = Buffer.from(w.data, 'hex'), good = Buffer.from(w.mac, 'hex'), bad = Buffer.from(good); bad[0] ^= 1;
const verify = (m) => code(() => { p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, ver); if (!p.C_Verify(s, data, m)) throw new Error('false'); });
const out = [];
out.push(['mismatch on a fresh thread', verify(bad)]);
out.push(['right MAC', verify(good)]);
out.push(['mismatch after the right MAC', verify(bad)]);
out.push(['ECDH with an off-curve point', code(() => p.C_DeriveKey(s, { mechanism: P.CKM_ECDH1_DERIVE, parameter: { type: P.CK_PARAMS_EC_DH, kdf: P.CKD_NULL, publicData: Buffer.from(w.offCurve, 'hex') } }, kx,
  [{ type: P.CKA_CLASS, value: P.CKO_SECRET_KEY }, { type: P.CKA_KEY_TYPE, value: P.CKK_GENERIC_SECRET }, { type: P.CKA_TOKEN, value: false }, { type: P.CKA_VALUE_LEN, value: 32 }]))]);
out.push(['mismatch after it', verify(bad)]);
const gcm = { mechanism: P.CKM_AES_GCM, parameter: { type: P.CK_PARAMS_AES_GCM_v240, iv: Buffer.alloc(12, 1), ivBits: 96, aad: Buffer.alloc(0), tagBits: 128 } };
p.C_EncryptInit(s, gcm, seal);
const ct = p.C_Encrypt(s, Buffer.alloc(16), Buffer.alloc(32)); ct[31] ^= 1;
out.push(['AES-GCM decrypt with a bad tag', code(() => { p.C_DecryptInit(s, gcm, seal); p.C_Decrypt(s, ct, Buffer.alloc(32)); })]);
out.push(['mismatch after it', verify(bad)]);
out.push(['right MAC', verify(good)]);
out.push(['mismatch after the right MAC', verify(bad)]);
p.C_CloseSession(s);
parentPort.postMessage(out);
`;

function mismatchSequence(target: Target, labels: { verifier: string; kx: string; seal: string }, data: Buffer, mac: Buffer): Promise<[string, number][]> {
  const offCurve = Buffer.from(p256.getPublicKey(p256.utils.randomSecretKey(), false));
  offCurve[64] = offCurve[64]! ^ 1;
  const worker = new Worker(MISMATCH_WORKER, {
    eval: true,
    workerData: {
      pkcs11: createRequire(import.meta.url).resolve('pkcs11js'),
      module: target.module,
      params: target.params,
      token: target.token,
      pin: target.pin,
      ...labels,
      data: data.toString('hex'),
      mac: mac.toString('hex'),
      offCurve: offCurve.toString('hex'),
    },
  });
  return new Promise((resolve, reject) => {
    worker.once('message', (m: [string, number][]) => resolve(m));
    worker.once('error', reject);
  });
}

// ---- the probe ------------------------------------------------------------------

async function probe(target: Target): Promise<{ info: Record<string, string> }> {
  const derives = num('derives', 50_000);
  const ratesMs = num('rates-ms', 1000);
  const rsaBits = num('rsa-bits', 3072);
  const run = randomBytes(3).toString('hex');
  const L = (name: string): string => `probe.${run}.${name}`;
  const info: Record<string, string> = {};
  const m = new Module(target);
  const p = m.p11;

  section = 'library';
  if (target.params) {
    step('init.noparams', 'C_Initialize', 'flags=CKF_OS_LOCKING_OK, no library parameters', () => {
      m.init(true);
      p.C_Finalize();
    });
  }
  step('init', 'C_Initialize', target.params ? `libraryParameters=${target.params}` : 'flags=CKF_OS_LOCKING_OK', () => m.init());
  step('init.twice', 'C_Initialize', 'a second time in the same process', () => m.init());
  step('info', 'C_GetInfo', '', () => {
    const i = p.C_GetInfo();
    info.library = `${i.libraryDescription.trim()} ${i.libraryVersion.major}.${i.libraryVersion.minor} (${i.manufacturerID.trim()}), Cryptoki ${i.cryptokiVersion.major}.${i.cryptokiVersion.minor}`;
    return info.library;
  });
  step('slots', 'C_GetSlotList(true) + C_GetTokenInfo', '', () => {
    const out: string[] = [];
    for (const s of p.C_GetSlotList(true)) {
      try {
        const t = p.C_GetTokenInfo(s);
        out.push(`slot ${s.readBigUInt64LE(0)} "${t.label.trim()}" ${flagNames(t.flags, TOKEN_FLAGS)}`);
      } catch (e) {
        out.push(`slot ${s.readBigUInt64LE(0)} ${failure(e)}`);
      }
    }
    return out.join('; ');
  });
  if (!step('slot', 'find token by label', target.token, () => {
    const s = m.findSlot();
    const t = p.C_GetTokenInfo(s);
    info.token = `slot ${s.readBigUInt64LE(0)}, model "${t.model.trim()}", PIN length ${t.minPinLen}..${t.maxPinLen}`;
    return info.token;
  })) return { info };

  section = 'mechanisms';
  let mechs = new Set<number>();
  step('mech.list', 'C_GetMechanismList', '', () => {
    mechs = new Set(p.C_GetMechanismList(m.slot));
    return `${mechs.size} mechanisms`;
  });
  for (const name of MECHANISMS) {
    const code = (P as unknown as Record<string, number>)[name]!;
    step(`mech.${name}`, 'C_GetMechanismInfo', name, () => {
      const mi = p.C_GetMechanismInfo(m.slot, code);
      return `${mechs.has(code) ? '' : 'NOT LISTED; '}keys ${mi.minKeySize}..${mi.maxKeySize}; ${flagNames(mi.flags, MECH_FLAGS)}`;
    });
  }

  section = 'login';
  const s1 = p.C_OpenSession(m.slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
  if (!flag('skip-wrong-pin')) step('login.wrong', 'C_Login(USER)', 'wrong PIN, nobody logged in', () => p.C_Login(s1, P.CKU_USER, `${target.pin}-wrong`));
  if (!step('login', 'C_Login(USER)', 'right PIN', () => p.C_Login(s1, P.CKU_USER, target.pin))) return { info };
  const s2 = m.open();
  step('login.again', 'C_Login(USER)', 'second session, right PIN', () => p.C_Login(s2, P.CKU_USER, target.pin));
  step('login.again.wrong', 'C_Login(USER)', 'second session, wrong PIN, while logged in', () => p.C_Login(s2, P.CKU_USER, `${target.pin}-wrong`));
  step('login.state', 'C_GetSessionInfo', 'second session', () => `state ${p.C_GetSessionInfo(s2).state} (3 = RW user functions)`);
  step('login.so.while.user', 'C_Login(SO)', `${target.soPin ? 'SO PIN' : 'empty PIN'} while the user is logged in`, () => p.C_Login(s2, P.CKU_SO, target.soPin ?? ''));
  step('login.lastclose', 'C_CloseSession all, C_OpenSession', 'is the new session still logged in?', () => {
    p.C_CloseSession(s1);
    p.C_CloseSession(s2);
    const s = m.open();
    const state = p.C_GetSessionInfo(s).state;
    p.C_CloseSession(s);
    return `state ${state} (${state === 3 ? 'still logged in' : 'logged out: closing the last session ends the login'})`;
  });
  let s = m.session();

  // ---- EC --------------------------------------------------------------------
  section = 'ec';
  let kx: { priv: Handle; pub: Handle } | undefined;
  let sig: { priv: Handle; pub: Handle } | undefined;
  const genEc = (label: string, usages: Usage[], t?: Attr[][]): { priv: Handle; pub: Handle } => {
    const [pub, priv] = t ?? [ecPublicTemplate(label, usages), ecPrivateTemplate(label, usages)];
    const kp = p.C_GenerateKeyPair(s, { mechanism: P.CKM_EC_KEY_PAIR_GEN }, pub!, priv!);
    return { priv: kp.privateKey, pub: kp.publicKey };
  };
  for (const [name, usages] of [
    ['kx', ['derive']],
    ['sig', ['sign']],
  ] as const) {
    const label = L(name);
    step(`ec.gen.${name}`, 'C_GenerateKeyPair', `CKM_EC_KEY_PAIR_GEN P-256, vault template, usages ${usages.join(',')}`, () => {
      try {
        const kp = genEc(label, [...usages]);
        if (name === 'kx') kx = kp;
        else sig = kp;
      } catch (e) {
        throw withNote(e, culprits([ecPublicTemplate(label, [...usages]), ecPrivateTemplate(label, [...usages])], (t) => {
          const kp = genEc(`${label}.culprit`, [...usages], t);
          p.C_DestroyObject(s, kp.priv);
          p.C_DestroyObject(s, kp.pub);
        }));
      }
    });
  }
  let point: Buffer = Buffer.alloc(0);
  if (kx) {
    const key = kx;
    step('ec.point', 'C_GetAttributeValue', 'CKA_EC_POINT of the public key', () => {
      const v = m.read(s, key.pub, P.CKA_EC_POINT) ?? Buffer.alloc(0);
      point = v.length === 67 && v[0] === 0x04 && v[1] === 0x41 ? v.subarray(2) : v;
      return `${v.length} bytes, ${v.length === 67 ? 'DER OCTET STRING around the point' : v.length === 65 ? 'raw point' : 'unexpected form'}`;
    });
    step('ec.attrs.kx', 'C_GetAttributeValue', 'policy attributes of the kx private key', () => attrSummary(key.priv, 'kx'));
    step('ecdh.base', 'C_DeriveKey + C_GetAttributeValue(VALUE) + C_DestroyObject', 'CKM_ECDH1_DERIVE CKD_NULL, point G, vault template', () => {
      const x = deriveX(key.priv, p256.Point.BASE.toBytes(false));
      return Buffer.from(x).equals(point.subarray(1, 33)) ? 'x(k·G) equals the public point x: pair check passes' : `MISMATCH (${x.length} bytes)`;
    });
    step('ecdh.random', 'C_DeriveKey', 'random valid point', () => {
      const x = deriveX(key.priv, p256.getPublicKey(p256.utils.randomSecretKey(), false));
      return `${x.length}-byte secret`;
    });
    step('ecdh.offcurve', 'C_DeriveKey', 'point off the curve', () => {
      const bad = Buffer.from(p256.getPublicKey(p256.utils.randomSecretKey(), false));
      bad[64] = bad[64]! ^ 1;
      deriveX(key.priv, bad);
      return 'ACCEPTED an off-curve point: the vault must validate points itself';
    });
  }
  if (sig) {
    const key = sig;
    step('ec.attrs.sig', 'C_GetAttributeValue', 'policy attributes of the sig private key', () => attrSummary(key.priv, 'sig'));
    step('ecdsa', 'C_Sign', 'CKM_ECDSA over a 32-byte digest', () => {
      const digest = sha256(new TextEncoder().encode('probe'));
      p.C_SignInit(s, { mechanism: P.CKM_ECDSA }, key.priv);
      const rs = p.C_Sign(s, Buffer.from(digest), Buffer.alloc(64));
      const pt = m.read(s, key.pub, P.CKA_EC_POINT) ?? Buffer.alloc(0);
      const pub = pt.length === 67 ? pt.subarray(2) : pt;
      const ok = p256.verify(rs, digest, pub, { prehash: false, format: 'compact', lowS: false });
      return `${rs.length}-byte r‖s, ${ok ? 'verifies' : 'DOES NOT VERIFY'}`;
    });
  }

  function deriveX(priv: Handle, pt: Uint8Array): Buffer {
    const d = p.C_DeriveKey(s, ecdh(pt), priv, ECDH_TEMPLATE);
    try {
      return Buffer.from(m.read(s, d, P.CKA_VALUE) ?? Buffer.alloc(0));
    } finally {
      p.C_DestroyObject(s, d);
    }
  }

  function attrSummary(h: Handle, name: KeySpec['name']): string {
    const a = m.keyAttributes(s, h);
    const v = violations(spec(name), a);
    const local = m.boolText(s, h, P.CKA_LOCAL);
    return (
      `SENSITIVE=${a.sensitive} EXTRACTABLE=${a.extractable} ALWAYS_SENSITIVE=${a.alwaysSensitive} NEVER_EXTRACTABLE=${a.neverExtractable} ` +
      `LOCAL=${local} MODIFIABLE=${a.modifiable} PRIVATE=${a.private} DERIVE=${a.derive} SIGN=${a.sign} VERIFY=${a.verify} ` +
      `ENCRYPT=${a.encrypt} DECRYPT=${a.decrypt} WRAP=${a.wrap} UNWRAP=${a.unwrap} VALUE_LEN=${a.valueLen}; ` +
      `policy: ${v.length ? v.map((x) => x.replace(`${a.label}: `, '')).join('; ') : 'accepted'}`
    );
  }

  // ---- HMAC ------------------------------------------------------------------
  section = 'hmac';
  let verifier: Handle | undefined;
  const verifierTpl = secretTemplate(L('verifier'), 'generic', 32, ['sign', 'verify']);
  step('hmac.gen', 'C_GenerateKey', 'CKM_GENERIC_SECRET_KEY_GEN 32 bytes, vault template, sign+verify', () => {
    try {
      verifier = p.C_GenerateKey(s, { mechanism: P.CKM_GENERIC_SECRET_KEY_GEN }, verifierTpl);
    } catch (e) {
      throw withNote(e, culprits([verifierTpl], ([t]) => p.C_DestroyObject(s, p.C_GenerateKey(s, { mechanism: P.CKM_GENERIC_SECRET_KEY_GEN }, t!))));
    }
  });
  const data = Buffer.from('vault id ‖ user id ‖ authKey');
  let mac: Buffer = Buffer.alloc(0);
  if (verifier) {
    const key = verifier;
    step('hmac.attrs', 'C_GetAttributeValue', 'policy attributes of the verifier key', () => attrSummary(key, 'verifier'));
    step('hmac.sign', 'C_Sign', 'CKM_SHA256_HMAC', () => {
      p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      mac = p.C_Sign(s, data, Buffer.alloc(32));
      return `${mac.length} bytes`;
    });
    step('hmac.verify', 'C_Verify', 'right MAC', () => {
      p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      return `returns ${String(p.C_Verify(s, data, mac))}`;
    });
    const bad = Buffer.from(mac);
    bad[0] = bad[0]! ^ 1;
    step('hmac.verify.bad', 'C_Verify', 'wrong MAC (one bit flipped)', () => {
      p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      return `returns ${String(p.C_Verify(s, data, bad))}`;
    });
    step('hmac.after.bad', 'C_GetSessionInfo, then C_SignInit/C_Sign on the same session', 'right after the mismatch', () => {
      const si = p.C_GetSessionInfo(s);
      p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      const again = p.C_Sign(s, data, Buffer.alloc(32));
      p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      const ok = p.C_Verify(s, data, again);
      return `session state ${si.state}, deviceError ${si.deviceError}; sign and a right verify on it work (${String(ok)}): the session is not dead`;
    });
    // A 31-byte view onto the right 32-byte MAC, then the same 31 bytes followed in
    // memory by a wrong byte: a module that reads 32 bytes anyway accepts the first.
    step('hmac.verify.short', 'C_Verify', '31-byte MAC (a view whose next byte in memory is the right 32nd)', () => {
      p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      return `returns ${String(p.C_Verify(s, data, mac.subarray(0, 31)))}: a truncated MAC is ACCEPTED`;
    });
    step('hmac.verify.short.next', 'C_Verify', 'the same 31 bytes, the byte after them in memory wrong', () => {
      const buf = Buffer.concat([mac.subarray(0, 31), Buffer.from([mac[31]! ^ 1])]);
      p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      return `returns ${String(p.C_Verify(s, data, buf.subarray(0, 31)))}`;
    });
    step('hmac.verify.bad.cost', 'C_Verify', 'wrong MAC, rate (thrown error each time)', () =>
      rate(ratesMs, () => {
        p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
        codeOf(() => p.C_Verify(s, data, bad));
      }),
    );
  }

  // ---- AES -------------------------------------------------------------------
  section = 'aes';
  let seal: Handle | undefined;
  const sealTpl = secretTemplate(L('seal'), 'aes', 32, ['encrypt', 'decrypt']);
  step('aes.gen', 'C_GenerateKey', 'CKM_AES_KEY_GEN 32 bytes, vault template, encrypt+decrypt', () => {
    try {
      seal = p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, sealTpl);
    } catch (e) {
      throw withNote(e, culprits([sealTpl], ([t]) => p.C_DestroyObject(s, p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, t!))));
    }
  });
  if (seal) {
    const key = seal;
    const iv = randomBytes(12);
    const aad = Buffer.from('record aad');
    const plain = randomBytes(64);
    let sealed: Buffer = Buffer.alloc(0);
    step('aes.attrs', 'C_GetAttributeValue', 'policy attributes of the seal key', () => attrSummary(key, 'seal'));
    step('gcm.encrypt', 'C_Encrypt', 'CKM_AES_GCM, CK_PARAMS_AES_GCM_v240, 96-bit IV, AAD, 128-bit tag, 64 bytes', () => {
      p.C_EncryptInit(s, gcm(iv, aad), key);
      sealed = p.C_Encrypt(s, plain, Buffer.alloc(plain.length + 16));
      return `${sealed.length} bytes (ciphertext‖tag)`;
    });
    step('gcm.decrypt', 'C_Decrypt', 'same parameters', () => {
      p.C_DecryptInit(s, gcm(iv, aad), key);
      const out = p.C_Decrypt(s, sealed, Buffer.alloc(sealed.length));
      return out.equals(plain) ? 'round trip equal' : 'ROUND TRIP DIFFERS';
    });
    step('gcm.badtag', 'C_Decrypt', 'last tag byte flipped', () => {
      const bad = Buffer.from(sealed);
      bad[bad.length - 1] = bad[bad.length - 1]! ^ 1;
      p.C_DecryptInit(s, gcm(iv, aad), key);
      p.C_Decrypt(s, bad, Buffer.alloc(bad.length));
      return 'ACCEPTED a bad tag';
    });
    step('gcm.after.badtag', 'C_GetSessionInfo + C_Decrypt', 'same session after the bad tag', () => {
      const si = p.C_GetSessionInfo(s);
      p.C_DecryptInit(s, gcm(iv, aad), key);
      const out = p.C_Decrypt(s, sealed, Buffer.alloc(sealed.length));
      return `state ${si.state}; a good decrypt works (${String(out.equals(plain))})`;
    });
    step('gcm.rate', 'C_EncryptInit + C_Encrypt', '64 bytes, rate', () =>
      rate(ratesMs, () => {
        p.C_EncryptInit(s, gcm(randomBytes(12), aad), key);
        p.C_Encrypt(s, plain, Buffer.alloc(80));
      }),
    );
  }

  if (verifier && kx && seal && mac.length === 32) {
    section = 'hmac';
    try {
      const seq = await mismatchSequence(target, { verifier: L('verifier'), kx: L('kx'), seal: L('seal') }, data, mac);
      const codes = new Set(seq.filter(([what]) => what.startsWith('mismatch')).map(([, c]) => c));
      note(
        'hmac.mismatch.thread',
        'C_Verify mismatch on a worker thread, between other failures',
        'fresh OS thread; after a success; after an off-curve ECDH; after a bad GCM tag',
        codes.size === 1 ? `always ${codeText([...codes][0]!)}` : `VARIES: ${[...codes].map(codeText).join(', ')}`,
        seq.map(([what, c]) => `${what}: ${codeText(c)}`).join('; '),
      );
    } catch (e) {
      note('hmac.mismatch.thread', 'C_Verify mismatch on a worker thread', '', failure(e));
    }
  }

  // ---- data objects: the vault's anchor today ---------------------------------
  section = 'data';
  const dataTpl = dataTemplate('bkv.state-anchor.probe', L('anchor.data'), Buffer.from('bkv state anchor v1'));
  step('data.private', 'C_CreateObject', 'CKO_DATA, vault anchor template (TOKEN, PRIVATE, MODIFIABLE, APPLICATION, LABEL, VALUE)', () => {
    try {
      const h = p.C_CreateObject(s, dataTpl);
      const c = codeOf(() => p.C_SetAttributeValue(s, h, [{ type: P.CKA_LABEL, value: L('anchor.data.2') }]));
      return `label rewrite: ${codeText(c)}`;
    } catch (e) {
      throw withNote(e, culprits([dataTpl], ([t]) => p.C_DestroyObject(s, p.C_CreateObject(s, t!))));
    }
  });
  const swap = (t: Attr[], type: number, value: boolean): Attr[] => t.map((a) => (a.type === type ? { type, value } : a));
  step('data.public', 'C_CreateObject', 'the same with CKA_PRIVATE=false', () => void p.C_CreateObject(s, swap(dataTpl, P.CKA_PRIVATE, false)));
  step('data.session', 'C_CreateObject', 'the same with CKA_TOKEN=false (session object)', () => {
    p.C_DestroyObject(s, p.C_CreateObject(s, swap(swap(dataTpl, P.CKA_TOKEN, false), P.CKA_PRIVATE, false)));
  });

  // ---- anchor candidates -----------------------------------------------------
  section = 'anchor';
  const anchorId = randomBytes(16);
  const anchorTpl: Attr[] = [
    { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
    { type: P.CKA_KEY_TYPE, value: P.CKK_GENERIC_SECRET },
    { type: P.CKA_TOKEN, value: true },
    { type: P.CKA_PRIVATE, value: true },
    { type: P.CKA_SENSITIVE, value: true },
    { type: P.CKA_EXTRACTABLE, value: false },
    { type: P.CKA_MODIFIABLE, value: true },
    { type: P.CKA_LABEL, value: L('anchor.key') },
    { type: P.CKA_ID, value: anchorId },
    { type: P.CKA_VALUE_LEN, value: 32 },
    ...usageTemplate([], 'secret'),
  ];
  let anchor: Handle | undefined;
  let lastAnchorLabel = '';
  step('anchor.key.gen', 'C_GenerateKey', 'generic secret token key, MODIFIABLE=true, no usages, CKA_ID', () => {
    anchor = p.C_GenerateKey(s, { mechanism: P.CKM_GENERIC_SECRET_KEY_GEN }, anchorTpl);
  });
  if (anchor) {
    const h = anchor;
    const setLabel = (sess: Handle, label: string): void => p.C_SetAttributeValue(sess, h, [{ type: P.CKA_LABEL, value: label }]);
    const getLabel = (sess: Handle): string => m.read(sess, h, P.CKA_LABEL)?.toString('utf8') ?? '';
    const anchorLabel = `bkv.anchor 123456 ${randomBytes(32).toString('hex')}`;
    step('anchor.key.label', 'C_SetAttributeValue(LABEL)', `"bkv.anchor <batch> <root hex>", ${anchorLabel.length} chars`, () => {
      setLabel(s, anchorLabel);
      return getLabel(s) === anchorLabel ? 'reads back equal' : 'READS BACK DIFFERENT';
    });
    step('anchor.key.label.max', 'C_SetAttributeValue(LABEL)', 'labels of 32..65536 chars', () => {
      let ok = 0;
      let refused = '';
      for (const n of [32, 64, 128, 255, 256, 1024, 4096, 65536]) {
        const c = codeOf(() => setLabel(s, 'x'.repeat(n)));
        if (c !== 0) {
          refused = `${n}: ${codeText(c)}`;
          break;
        }
        if (getLabel(s).length !== n) {
          refused = `${n}: reads back ${getLabel(s).length} chars`;
          break;
        }
        ok = n;
      }
      setLabel(s, anchorLabel);
      return `longest accepted ${ok}${refused ? `; refused at ${refused}` : ''}`;
    });
    step('anchor.key.id', 'C_SetAttributeValue(ID)', 'rewrite CKA_ID', () => {
      p.C_SetAttributeValue(s, h, [{ type: P.CKA_ID, value: anchorId }]);
    });
    step('anchor.key.raw', 'C_SetAttributeValue(LABEL) then read on another session', '500 writes, each read back at once', () => {
      const other = m.session();
      let stale = 0;
      for (let i = 0; i < 500; i++) {
        const v = `bkv.anchor ${i} ${randomBytes(32).toString('hex')}`;
        setLabel(s, v);
        if (getLabel(other) !== v) stale++;
      }
      p.C_CloseSession(other);
      setLabel(s, anchorLabel);
      return `${stale} stale reads`;
    });
    step('anchor.key.rate', 'C_SetAttributeValue(LABEL)', 'write rate', () => {
      let i = 0;
      const r = rate(ratesMs, () => setLabel(s, `bkv.anchor ${i++} ${anchorLabel.slice(-64)}`));
      setLabel(s, anchorLabel);
      return r;
    });
    step('anchor.key.read.rate', 'C_GetAttributeValue(LABEL)', 'read rate', () => rate(ratesMs, () => getLabel(s)));
    step('anchor.key.child.read', 'another process: C_Initialize, login, find by CKA_ID, read LABEL', 'after this process wrote', () => {
      const got = child(target, ['--child', 'read-label', '--id', anchorId.toString('hex')]);
      return got === anchorLabel ? 'sees the latest label' : `SEES "${got.slice(0, 40)}"`;
    });
    const fromChild = `bkv.anchor 999 ${randomBytes(32).toString('hex')}`;
    lastAnchorLabel = fromChild;
    step('anchor.key.child.write', 'another process writes LABEL; this process reads its old handle', '', () => {
      child(target, ['--child', 'write-label', '--id', anchorId.toString('hex'), '--label', fromChild]);
      const got = getLabel(s);
      return got === fromChild ? 'this process sees the other process\'s write' : got === anchorLabel ? 'this process still sees its OWN last write (cached)' : `sees "${got.slice(0, 40)}"`;
    });
  }
  // A public EC key object as the anchor, for modules that refuse secret-key label writes.
  step('anchor.pub.create', 'C_CreateObject + C_SetAttributeValue(LABEL)', 'CKO_PUBLIC_KEY EC P-256, TOKEN, PRIVATE=false, MODIFIABLE=true', () => {
    const pt = Buffer.from(p256.getPublicKey(p256.utils.randomSecretKey(), false));
    const h = p.C_CreateObject(s, [
      { type: P.CKA_CLASS, value: P.CKO_PUBLIC_KEY },
      { type: P.CKA_KEY_TYPE, value: P.CKK_EC },
      { type: P.CKA_TOKEN, value: true },
      { type: P.CKA_PRIVATE, value: false },
      { type: P.CKA_MODIFIABLE, value: true },
      { type: P.CKA_LABEL, value: L('anchor.pub') },
      { type: P.CKA_EC_PARAMS, value: P256_OID },
      { type: P.CKA_EC_POINT, value: Buffer.concat([Buffer.from([0x04, 0x41]), pt]) },
    ]);
    const c = codeOf(() => p.C_SetAttributeValue(s, h, [{ type: P.CKA_LABEL, value: L('anchor.pub.2') }]));
    return `label rewrite: ${codeText(c)}`;
  });

  // ---- frozen keys: does MODIFIABLE=false hold? ----------------------------------
  section = 'modify';
  if (verifier) {
    const h = verifier;
    for (const [what, type, value] of [
      ['LABEL', P.CKA_LABEL, L('renamed')],
      ['EXTRACTABLE=true', P.CKA_EXTRACTABLE, true],
      ['SENSITIVE=false', P.CKA_SENSITIVE, false],
      ['DERIVE=true', P.CKA_DERIVE, true],
    ] as const) {
      step(`modify.frozen.${what}`, 'C_SetAttributeValue', `${what} on the MODIFIABLE=false verifier key`, () => {
        p.C_SetAttributeValue(s, h, [{ type, value }]);
        return 'CHANGED a frozen key';
      });
    }
  }
  if (anchor) {
    const h = anchor;
    step('modify.open.EXTRACTABLE', 'C_SetAttributeValue', 'EXTRACTABLE false→true on a MODIFIABLE=true key', () => {
      p.C_SetAttributeValue(s, h, [{ type: P.CKA_EXTRACTABLE, value: true }]);
      return `CHANGED; EXTRACTABLE now ${m.boolText(s, h, P.CKA_EXTRACTABLE)}`;
    });
  }

  // ---- wrapping ----------------------------------------------------------------
  section = 'wrap';
  let w: Handle | undefined;
  step('wrap.sessionkey', 'C_GenerateKey', 'CKM_AES_KEY_GEN session key, vault tryWrap template (WRAP, UNWRAP)', () => {
    w = p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, SESSION_WRAP_TEMPLATE);
  });
  if (w) {
    const wk = w;
    for (const [name, key] of [
      ['verifier', verifier],
      ['seal', seal],
      ['kx', kx?.priv],
    ] as const) {
      if (!key) continue;
      step(`wrap.${name}`, 'C_WrapKey', `CKM_AES_KEY_WRAP_PAD of the EXTRACTABLE=false ${name} key`, () => {
        const blob = p.C_WrapKey(s, WRAP_PAD, wk, key, Buffer.alloc(4096));
        let proof = '';
        if (name === 'verifier' && verifier) {
          const clone = p.C_UnwrapKey(s, WRAP_PAD, wk, blob, [
            { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
            { type: P.CKA_KEY_TYPE, value: P.CKK_GENERIC_SECRET },
            { type: P.CKA_TOKEN, value: false },
            { type: P.CKA_SIGN, value: true },
          ]);
          p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, clone);
          const m2 = p.C_Sign(s, data, Buffer.alloc(32));
          proof = m2.equals(mac) ? '; unwrapped copy gives the same HMAC: the key material LEFT the token' : '; unwrapped copy differs';
        }
        return `WRAPPED (${blob.length} bytes)${proof}; afterwards EXTRACTABLE=${m.boolText(s, key, P.CKA_EXTRACTABLE)} NEVER_EXTRACTABLE=${m.boolText(s, key, P.CKA_NEVER_EXTRACTABLE)}`;
      });
    }
    if (seal) {
      const key = seal;
      step('wrap.seal.nopad', 'C_WrapKey', 'CKM_AES_KEY_WRAP (RFC 3394) of the seal key', () => `WRAPPED (${p.C_WrapKey(s, { mechanism: P.CKM_AES_KEY_WRAP }, wk, key, Buffer.alloc(4096)).length} bytes)`);
    }
    // Keys meant for a cloning ceremony (COHORT.md): EXTRACTABLE, but only under a trusted key.
    let wwt: Handle | undefined;
    step('wrap.wwt.gen', 'C_GenerateKey', 'session generic secret, SENSITIVE, EXTRACTABLE, WRAP_WITH_TRUSTED=true', () => {
      wwt = p.C_GenerateKey(s, { mechanism: P.CKM_GENERIC_SECRET_KEY_GEN }, [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_VALUE_LEN, value: 32 },
        { type: P.CKA_SENSITIVE, value: true },
        { type: P.CKA_EXTRACTABLE, value: true },
        { type: P.CKA_WRAP_WITH_TRUSTED, value: true },
        { type: P.CKA_SIGN, value: true },
      ]);
      return `reads back WRAP_WITH_TRUSTED=${m.boolText(s, wwt, P.CKA_WRAP_WITH_TRUSTED)}`;
    });
    if (wwt) {
      const key = wwt;
      step('wrap.wwt.untrusted', 'C_WrapKey', 'that key under the untrusted session key', () => {
        p.C_WrapKey(s, WRAP_PAD, wk, key, Buffer.alloc(4096));
        return 'WRAPPED: WRAP_WITH_TRUSTED is not enforced';
      });
    }
    step('wrap.trusted.user', 'C_GenerateKey', 'session AES key with CKA_TRUSTED=true, as the user', () => {
      p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, [...SESSION_WRAP_TEMPLATE, { type: P.CKA_TRUSTED, value: true }]);
      return 'the USER can make a trusted key';
    });
  }

  // RSA-OAEP transport keys and C_UnwrapKey into the vault's own templates.
  let rsa: { priv: Handle; pub: Handle } | undefined;
  step('rsa.gen', 'C_GenerateKeyPair', `CKM_RSA_PKCS_KEY_PAIR_GEN ${rsaBits} bits, session; private SENSITIVE, EXTRACTABLE=false, unwrap-only`, () => {
    const t0 = performance.now();
    const kp = p.C_GenerateKeyPair(
      s,
      { mechanism: P.CKM_RSA_PKCS_KEY_PAIR_GEN },
      [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_MODULUS_BITS, value: rsaBits },
        { type: P.CKA_PUBLIC_EXPONENT, value: Buffer.from([1, 0, 1]) },
        { type: P.CKA_WRAP, value: true },
        { type: P.CKA_ENCRYPT, value: false },
        { type: P.CKA_VERIFY, value: false },
      ],
      [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_PRIVATE, value: true },
        { type: P.CKA_SENSITIVE, value: true },
        { type: P.CKA_EXTRACTABLE, value: false },
        { type: P.CKA_UNWRAP, value: true },
        { type: P.CKA_DECRYPT, value: false },
        { type: P.CKA_SIGN, value: false },
      ],
    );
    rsa = { priv: kp.privateKey, pub: kp.publicKey };
    return `${Math.round(performance.now() - t0)} ms`;
  });
  const extractable = (kind: 'aes' | 'generic'): Handle =>
    p.C_GenerateKey(s, { mechanism: kind === 'aes' ? P.CKM_AES_KEY_GEN : P.CKM_GENERIC_SECRET_KEY_GEN }, [
      { type: P.CKA_TOKEN, value: false },
      { type: P.CKA_VALUE_LEN, value: 32 },
      { type: P.CKA_SENSITIVE, value: true },
      { type: P.CKA_EXTRACTABLE, value: true },
      ...(kind === 'aes'
        ? [
            { type: P.CKA_ENCRYPT, value: true },
            { type: P.CKA_DECRYPT, value: true },
            { type: P.CKA_WRAP, value: true },
            { type: P.CKA_UNWRAP, value: true },
          ]
        : [{ type: P.CKA_SIGN, value: true }]),
    ]);
  /** Unwrap into a vault template; if refused, say which attributes are to blame and retry without them. */
  const unwrapInto = (mech: pkcs11js.Mechanism, by: Handle, blob: Buffer, tpl: Attr[]): { h: Handle; note: string } => {
    try {
      return { h: p.C_UnwrapKey(s, mech, by, blob, tpl), note: 'vault template as is' };
    } catch (e) {
      const why = `vault template refused at C_UnwrapKey (${failure(e)})`;
      const found = blame([tpl], ([t]) => p.C_DestroyObject(s, p.C_UnwrapKey(s, mech, by, blob, t!)));
      if (!found) throw withNote(e, `${why}; no single attribute or pair is to blame`);
      // Leave out every culprit: with singles, each alone would do, but the clone shows all of them.
      const h = p.C_UnwrapKey(s, mech, by, blob, tpl.filter((x) => !found.attrs.includes(x)));
      return { h, note: `${why}; accepted without ${found.attrs.map(attrText).join(found.both ? ' and ' : ' (or) ')}` };
    }
  };
  /** C_WrapKey, its failure marked as such (not the unwrap that follows). */
  const wrapStage = (mech: pkcs11js.Mechanism, by: Handle, key: Handle, size: number): Buffer => {
    try {
      return p.C_WrapKey(s, mech, by, key, Buffer.alloc(size));
    } catch (e) {
      throw withNote(e, 'at C_WrapKey');
    }
  };
  const cloneAttrs = (h: Handle): string =>
    `ALWAYS_SENSITIVE=${m.boolText(s, h, P.CKA_ALWAYS_SENSITIVE)} NEVER_EXTRACTABLE=${m.boolText(s, h, P.CKA_NEVER_EXTRACTABLE)} LOCAL=${m.boolText(s, h, P.CKA_LOCAL)} EXTRACTABLE=${m.boolText(s, h, P.CKA_EXTRACTABLE)} MODIFIABLE=${m.boolText(s, h, P.CKA_MODIFIABLE)}`;
  if (rsa) {
    const r = rsa;
    for (const hash of ['sha1', 'sha256'] as const) {
      step(`oaep.${hash}.aes`, 'C_WrapKey + C_UnwrapKey', `CKM_RSA_PKCS_OAEP ${hash.toUpperCase()}/MGF1, extractable AES → vault seal template`, () => {
        const src = extractable('aes');
        const blob = wrapStage(oaep(hash), r.pub, src, 1024);
        const { h, note: how } = unwrapInto(oaep(hash), r.priv, blob, secretTemplate(L(`clone.seal.${hash}`), 'aes', 32, ['encrypt', 'decrypt']));
        const iv = randomBytes(12);
        const enc = (k: Handle): Buffer => {
          p.C_EncryptInit(s, gcm(iv, Buffer.alloc(0)), k);
          return p.C_Encrypt(s, Buffer.from('same key?'), Buffer.alloc(32));
        };
        return `${how}; GCM output ${enc(src).equals(enc(h)) ? 'matches' : 'DIFFERS'}; clone ${cloneAttrs(h)}`;
      });
    }
    step('oaep.sha1.hmac', 'C_WrapKey + C_UnwrapKey', 'OAEP SHA-1, extractable generic secret → vault verifier template', () => {
      const src = extractable('generic');
      const blob = wrapStage(oaep('sha1'), r.pub, src, 1024);
      const { h, note: how } = unwrapInto(oaep('sha1'), r.priv, blob, secretTemplate(L('clone.verifier'), 'generic', 32, ['sign', 'verify']));
      const hm = (k: Handle): Buffer => {
        p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, k);
        return p.C_Sign(s, data, Buffer.alloc(32));
      };
      return `${how}; HMAC ${hm(src).equals(hm(h)) ? 'matches' : 'DIFFERS'}`;
    });
    step('oaep.sha1.transport', 'C_WrapKey', 'OAEP SHA-1 of an extractable AES transport key', () => `WRAPPED (${p.C_WrapKey(s, oaep('sha1'), r.pub, extractable('aes'), Buffer.alloc(1024)).length} bytes)`);
  }
  step('unwrap.ec', 'C_WrapKey + C_UnwrapKey', 'extractable EC key under AES_KEY_WRAP_PAD → vault EC private template (kx usages)', () => {
    const src = p.C_GenerateKeyPair(
      s,
      { mechanism: P.CKM_EC_KEY_PAIR_GEN },
      [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_EC_PARAMS, value: P256_OID },
      ],
      [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_PRIVATE, value: true },
        { type: P.CKA_SENSITIVE, value: true },
        { type: P.CKA_EXTRACTABLE, value: true },
        { type: P.CKA_DERIVE, value: true },
      ],
    );
    const transport = extractable('aes');
    const blob = wrapStage(WRAP_PAD, transport, src.privateKey, 4096);
    const tpl: Attr[] = [
      { type: P.CKA_CLASS, value: P.CKO_PRIVATE_KEY },
      { type: P.CKA_KEY_TYPE, value: P.CKK_EC },
      ...ecPrivateTemplate(L('clone.kx'), ['derive']),
    ];
    let unwrapped: { h: Handle; note: string };
    try {
      unwrapped = unwrapInto(WRAP_PAD, transport, blob, tpl);
    } catch (e) {
      // Some modules want more in the template than the wrapped PKCS#8 carries: the curve,
      // or (NSS) its vendor attribute CKA_NSS_DB holding the public point.
      const c = ckrOf(e) ?? -1;
      const srcPoint = m.read(s, src.publicKey, P.CKA_EC_POINT) ?? Buffer.alloc(0);
      const extras: [string, Attr][] = [
        ['CKA_EC_PARAMS', { type: P.CKA_EC_PARAMS, value: P256_OID }],
        ['CKA_NSS_DB (0xd5a0db00) = the public point', { type: CKA_NSS_DB, value: srcPoint }],
      ];
      let found: { h: Handle; note: string } | undefined;
      for (const [name, extra] of extras) {
        try {
          found = { h: p.C_UnwrapKey(s, WRAP_PAD, transport, blob, [...tpl, extra]), note: `vault template refused (${codeText(c)}), accepted with ${name} added` };
          break;
        } catch {
          /* next */
        }
      }
      if (!found) throw withNote(e, 'also refused with CKA_EC_PARAMS or CKA_NSS_DB added');
      unwrapped = found;
    }
    const { h, note: how } = unwrapped;
    const pt = p256.getPublicKey(p256.utils.randomSecretKey(), false);
    const same = deriveX(src.privateKey, pt).equals(deriveX(h, pt));
    return `${how}; ECDH ${same ? 'matches' : 'DIFFERS'}; EC_PARAMS ${(m.read(s, h, P.CKA_EC_PARAMS) ?? Buffer.alloc(0)).equals(P256_OID) ? 'filled in' : 'missing'}; clone ${cloneAttrs(h)}`;
  });

  // ---- SO and CKA_TRUSTED -----------------------------------------------------
  section = 'so';
  step('so.login', 'C_Logout, C_Login(SO)', target.soPin ? 'SO PIN' : 'empty PIN (no SO PIN known)', () => {
    p.C_Logout(s);
    p.C_Login(s, P.CKU_SO, target.soPin ?? '');
    let trusted: Handle | undefined;
    const made = codeOf(() => {
      trusted = p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, [
        { type: P.CKA_TOKEN, value: true },
        { type: P.CKA_PRIVATE, value: false },
        { type: P.CKA_LABEL, value: L('trusted') },
        { type: P.CKA_VALUE_LEN, value: 32 },
        { type: P.CKA_TRUSTED, value: true },
        { type: P.CKA_WRAP, value: true },
        { type: P.CKA_UNWRAP, value: true },
        { type: P.CKA_SENSITIVE, value: true },
        { type: P.CKA_EXTRACTABLE, value: true },
        { type: P.CKA_WRAP_WITH_TRUSTED, value: true },
      ]);
    });
    p.C_Logout(s);
    p.C_Login(s, P.CKU_USER, target.pin);
    let wrapped = 'not tried';
    if (trusted) {
      const [t] = m.find(s, [{ type: P.CKA_LABEL, value: L('trusted') }]);
      const key = p.C_GenerateKey(s, { mechanism: P.CKM_GENERIC_SECRET_KEY_GEN }, [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_VALUE_LEN, value: 32 },
        { type: P.CKA_SENSITIVE, value: true },
        { type: P.CKA_EXTRACTABLE, value: true },
        { type: P.CKA_WRAP_WITH_TRUSTED, value: true },
      ]);
      wrapped = codeText(codeOf(() => p.C_WrapKey(s, WRAP_PAD, t!, key, Buffer.alloc(4096))));
    }
    return `SO makes a TRUSTED wrapping key: ${codeText(made)}; a WRAP_WITH_TRUSTED key wraps under it: ${wrapped}`;
  });
  // The SO step logged the user out and in again: some modules drop object handles then.
  codeOf(() => p.C_Login(s, P.CKU_USER, target.pin));
  if (verifier) {
    const h = verifier;
    note('so.handles', 'C_Sign with a handle from before C_Logout', '', codeText(codeOf(() => p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, h))));
    codeOf(() => p.C_Sign(s, data, Buffer.alloc(32)));
  }

  // ---- rates -------------------------------------------------------------------
  // Token-object operations can be slow (NSS reads the key from its database each
  // time); a session copy of a key stays in memory. Allowed? Same guarantees?
  section = 'copy';
  const tokenVerifier = m.find(s, [{ type: P.CKA_CLASS, value: P.CKO_SECRET_KEY }, { type: P.CKA_LABEL, value: L('verifier') }])[0];
  if (tokenVerifier) {
    step('copy.session', 'C_CopyObject', 'the verifier key into a session object (CKA_TOKEN=false)', () => {
      const copy = p.C_CopyObject(s, tokenVerifier, [{ type: P.CKA_TOKEN, value: false }]);
      p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, copy);
      const same = p.C_Sign(s, data, Buffer.alloc(32)).equals(mac);
      const sign = (k: Handle) => () => {
        p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, k);
        p.C_Sign(s, data, Buffer.alloc(32));
      };
      const copyAttrs = `SENSITIVE=${m.boolText(s, copy, P.CKA_SENSITIVE)} EXTRACTABLE=${m.boolText(s, copy, P.CKA_EXTRACTABLE)} NEVER_EXTRACTABLE=${m.boolText(s, copy, P.CKA_NEVER_EXTRACTABLE)} MODIFIABLE=${m.boolText(s, copy, P.CKA_MODIFIABLE)}`;
      return `HMAC ${same ? 'same' : 'DIFFERS'}; copy ${copyAttrs}; HMAC sign on the token key ${rate(ratesMs, sign(tokenVerifier))}, on the session copy ${rate(ratesMs, sign(copy))}`;
    });
    step('copy.extractable', 'C_CopyObject', 'the verifier key with CKA_EXTRACTABLE=true', () => {
      p.C_CopyObject(s, tokenVerifier, [
        { type: P.CKA_TOKEN, value: false },
        { type: P.CKA_EXTRACTABLE, value: true },
      ]);
      return 'made an EXTRACTABLE copy of a non-extractable key';
    });
  }

  section = 'rates';
  const again = (label: string, cls: number): Handle | undefined => m.find(s, [{ type: P.CKA_CLASS, value: cls }, { type: P.CKA_LABEL, value: label }])[0];
  const kxPriv = again(L('kx'), P.CKO_PRIVATE_KEY);
  const sigPriv = again(L('sig'), P.CKO_PRIVATE_KEY);
  const ver = again(L('verifier'), P.CKO_SECRET_KEY);
  if (ver) {
    step('rate.hmac.sign', 'C_SignInit + C_Sign', 'CKM_SHA256_HMAC', () =>
      rate(ratesMs, () => {
        p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, ver);
        p.C_Sign(s, data, Buffer.alloc(32));
      }),
    );
    step('rate.hmac.verify', 'C_VerifyInit + C_Verify', 'right MAC', () =>
      rate(ratesMs, () => {
        p.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, ver);
        p.C_Verify(s, data, mac);
      }),
    );
  }
  if (sigPriv) {
    const digest = Buffer.from(sha256(data));
    step('rate.ecdsa', 'C_SignInit + C_Sign', 'CKM_ECDSA', () =>
      rate(ratesMs, () => {
        p.C_SignInit(s, { mechanism: P.CKM_ECDSA }, sigPriv);
        p.C_Sign(s, digest, Buffer.alloc(64));
      }),
    );
  }
  step('rate.keygen', 'C_GenerateKey + C_DestroyObject', 'AES-256 token key, vault template', () =>
    rate(ratesMs, () => p.C_DestroyObject(s, p.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, secretTemplate(L('rate'), 'aes', 32, ['encrypt'])))),
  );

  // ---- memory: session objects left by ECDH derives --------------------------
  section = 'memory';
  if (kxPriv && derives > 0) {
    step('mem.derive', 'C_DeriveKey + C_GetAttributeValue + C_DestroyObject', `${derives} ECDH derives on one session`, () => {
      const pt = p256.getPublicKey(p256.utils.randomSecretKey(), false);
      for (let i = 0; i < 200; i++) deriveX(kxPriv, pt);
      const before = rss();
      const t0 = performance.now();
      for (let i = 0; i < derives; i++) deriveX(kxPriv, pt);
      const secs = (performance.now() - t0) / 1000;
      const after = rss();
      return `${Math.round(derives / secs)}/s; RSS ${mib(before)} → ${mib(after)} (${Math.round((after - before) / derives)} B per derive)`;
    });
  }

  // ---- recycle: C_Finalize + C_Initialize in one process ----------------------
  section = 'recycle';
  const oldSession = s;
  const oldKey = ver;
  step('recycle', 'C_Finalize + C_Initialize', target.params ? 'with the same library parameters' : '', () => {
    const before = rss();
    p.C_Finalize();
    m.init();
    m.findSlot();
    s = m.session();
    return `RSS ${mib(before)} → ${mib(rss())}`;
  });
  note('recycle.session', 'C_GetSessionInfo', 'a session handle from before', codeText(codeOf(() => p.C_GetSessionInfo(oldSession))));
  if (oldKey) {
    note('recycle.handle', 'C_SignInit', 'an object handle from before, after a new login', codeText(codeOf(() => p.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, oldKey))), 'OK means handles survive a recycle');
    codeOf(() => p.C_Sign(s, data, Buffer.alloc(32)));
  }
  step('recycle.find', 'C_FindObjects', 'the verifier key again by label', () => `${m.find(s, [{ type: P.CKA_LABEL, value: L('verifier') }]).length} found`);
  if (anchor) {
    step('recycle.anchor', 'C_FindObjects(CKA_ID) + C_GetAttributeValue(LABEL)', 'the anchor key label after the recycle', () => {
      const [h] = m.find(s, [{ type: P.CKA_CLASS, value: P.CKO_SECRET_KEY }, { type: P.CKA_ID, value: anchorId }]);
      if (!h) return 'anchor key NOT FOUND';
      const got = m.read(s, h, P.CKA_LABEL)?.toString('utf8') ?? '';
      return got === lastAnchorLabel ? 'the last label written survived' : `reads "${got.slice(0, 40)}"`;
    });
  }

  // ---- cleanup -----------------------------------------------------------------
  section = 'cleanup';
  step('cleanup', 'C_FindObjects + C_DestroyObject', `every token object labelled probe.${run}.*`, () => {
    let n = 0;
    for (const h of m.find(s, [{ type: P.CKA_TOKEN, value: true }])) {
      const label = codeOf(() => m.read(s, h, P.CKA_LABEL)) === 0 ? (m.read(s, h, P.CKA_LABEL)?.toString('utf8') ?? '') : '';
      if (label.startsWith(`probe.${run}.`) && codeOf(() => p.C_DestroyObject(s, h)) === 0) n++;
    }
    return `${n} destroyed`;
  });
  codeOf(() => p.C_CloseSession(s));
  codeOf(() => p.C_Finalize());
  return { info };
}

// ---- output ----------------------------------------------------------------------

// Some modules pad labels and models with NULs; no control character belongs in a table.
const cell = (v: string): string => v.replace(/[\u0000-\u001f]+/g, ' ').replace(/\|/g, '\\|');

function printTable(info: Record<string, string>, target: Target): void {
  console.log(`## ${target.module}`);
  if (target.params) console.log(`\nlibrary parameters: \`${target.params}\``);
  for (const [k, v] of Object.entries(info)) console.log(`\n${k}: ${cell(v)}`);
  console.log('\n| id | call | template / mechanism | result | notes |\n|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.id} | ${cell(r.call)} | ${cell(r.detail)} | ${cell(r.result)} | ${cell(r.notes)} |`);
}

function compare(files: string[]): void {
  const runs = files.map((f) => JSON.parse(readFileSync(f, 'utf8')) as { name: string; rows: Row[] });
  const ids: string[] = [];
  for (const r of runs) for (const row of r.rows) if (!ids.includes(row.id)) ids.push(row.id);
  const head = runs.map((r) => r.name);
  console.log(`| id | call | template / mechanism | ${head.join(' | ')} |\n|---|---|---|${head.map(() => '---|').join('')}`);
  for (const id of ids) {
    const first = runs.map((r) => r.rows.find((x) => x.id === id)).find(Boolean)!;
    const cells = runs.map((r) => {
      const x = r.rows.find((y) => y.id === id);
      return x ? cell(`${x.result}${x.notes ? ` — ${x.notes}` : ''}`) : '—';
    });
    console.log(`| ${id} | ${cell(first.call)} | ${cell(first.detail)} | ${cells.join(' | ')} |`);
  }
}

async function temp(kind: string): Promise<{ target: Target; cleanup: () => void }> {
  if (kind === 'softhsm') {
    const { makeToken } = await import('../test/helpers/softhsm.js');
    const t = makeToken({ label: `probe-${randomBytes(3).toString('hex')}` });
    return { target: { module: t.modulePath, token: t.label, pin: t.pin, soPin: t.soPin }, cleanup: t.cleanup };
  }
  if (kind === 'nss') {
    const { makeNssToken } = await import('../test/helpers/nss.js');
    const t = makeNssToken();
    return { target: { module: t.modulePath, params: t.standaloneParameters, token: t.label, pin: t.pin }, cleanup: t.cleanup };
  }
  throw new Error(`--temp ${kind}: want softhsm or nss`);
}

async function main(): Promise<void> {
  const compareAt = argv.indexOf('--compare');
  if (compareAt >= 0) return compare(argv.slice(compareAt + 1).filter((a) => !a.startsWith('--')));
  let cleanup = (): void => {};
  let target: Target;
  const tempKind = opt('temp');
  if (tempKind) {
    ({ target, cleanup } = await temp(tempKind));
  } else {
    const module = opt('module');
    const token = opt('token');
    const pin = opt('pin');
    if (!module || !token || pin === undefined) {
      console.error('usage: probe-pkcs11.ts --module PATH [--params STRING] --token LABEL --pin PIN [--so-pin PIN] | --temp softhsm|nss');
      process.exit(2);
    }
    target = { module, params: opt('params'), token, pin, soPin: opt('so-pin') };
  }
  const childKind = opt('child');
  if (childKind) return childMode(childKind, target);
  try {
    const { info } = await probe(target);
    printTable(info, target);
    const json = opt('json');
    if (json) writeFileSync(json, JSON.stringify({ name: opt('name') ?? info.library ?? target.module, target: { ...target, pin: undefined, soPin: undefined }, info, rows }, null, 1));
  } finally {
    cleanup();
  }
}

await main();
