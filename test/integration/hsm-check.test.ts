// The capability check (vault/hsm/capabilities.ts, `bkv-admin hsm check`) and
// the quirks it picks, against real SoftHSM2 and real NSS softoken tokens:
// - SoftHSM2: every mechanism, data-object anchor, CKR_SIGNATURE_INVALID,
//   nothing wrappable; the check leaves no object behind.
// - NSS: data objects refused, C_Verify mismatch = CKR_DEVICE_ERROR, keys wrappable;
//   a wrong password is still a counted guess (main thread and HSM workers), and
//   only because of the learned quirk (control: forcing C_Verify turns it into
//   HSM_UNAVAILABLE); init refuses wrappable keys before creating anything and
//   serves them only with the explicit acceptance, which status shows.
// - Modules this machine does not have (openCryptoki 3.8 soft token, tpm2-pkcs11):
//   a test double at the one seam (the token the real check runs on hides what
//   those modules lack), next to the real tests above.
import { describe, it, expect, afterAll } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import pino from 'pino';
import { makeToken, hsmOf, type TestToken } from '../helpers/softhsm.js';
import { ADMIN, TEST_CONFIG, startDaemon } from '../helpers/daemon.js';
import { makeNssToken } from '../helpers/nss.js';
import { readFileSync } from 'node:fs';
import { inspectModule, inspectToken, type CapabilityReport } from '../../vault/hsm/capabilities.js';
import { Token, type TokenConfig } from '../../vault/hsm/token.js';
import { CKR } from '../../vault/hsm/ckr.js';
import { openVault } from '../../vault/core/open.js';
import { initVault } from '../../vault/setup.js';
import { loadConfig } from '../../vault/config.js';
import { offlineStatus } from '../../vault/admin/status.js';
import { ANCHOR } from '../../hsm-policy/policy.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { enroll, recover } from '../helpers/flows.js';
import { TEST_KDF } from '../helpers/vault.js';
import { ErrorCodes } from '../../protocol/errors.js';
import { codeOf } from '../helpers/codes.js';

const log = pino({ level: 'silent' });
const tokens: TestToken[] = [];
const dirs: string[] = [];
const token = (module: 'softhsm' | 'nss'): TestToken => {
  const t = makeToken({ module });
  tokens.push(t);
  return t;
};
const tempDir = (): string => {
  const d = mkdtempSync(join(tmpdir(), 'bkv-check-'));
  dirs.push(d);
  return d;
};

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  for (const t of tokens) t.cleanup();
});

/** Every token object, by class and label: what the check must leave as it found it. */
function objects(cfg: TokenConfig): string[] {
  const t = Token.open(cfg);
  try {
    return t.objects().map((o) => `${o.cls}:${o.label}`).sort();
  } finally {
    t.close();
  }
}

const check = (r: CapabilityReport, name: string) => r.checks.find((c) => c.name === name);

describe('capability check on SoftHSM2', () => {
  it('finds every mechanism the policy needs, data-object anchors, CKR_SIGNATURE_INVALID, nothing wrappable, and leaves no object behind', async () => {
    const t = token('softhsm');
    const before = objects(hsmOf(t));
    const r = inspectModule(hsmOf(t));
    expect(r.missing).toEqual([]);
    expect(r.mechanisms.filter((m) => m.required).map((m) => m.name).sort()).toEqual(
      ['CKM_AES_GCM', 'CKM_AES_KEY_GEN', 'CKM_ECDH1_DERIVE', 'CKM_ECDSA', 'CKM_EC_KEY_PAIR_GEN', 'CKM_GENERIC_SECRET_KEY_GEN', 'CKM_SHA256_HMAC'].sort(),
    );
    const ecdh = r.mechanisms.find((m) => m.name === 'CKM_ECDH1_DERIVE')!;
    expect(ecdh.flags).toContain('CKF_DERIVE');
    expect(ecdh.minKeySize).toBeLessThanOrEqual(256);
    expect(ecdh.maxKeySize).toBeGreaterThanOrEqual(256);
    expect(r.quirks).toEqual({ verify: 'verify', anchor: 'data', template: 'full', keyPhase: 'open' });
    expect(check(r, 'hmac.verify-mismatch')?.detail).toContain('CKR_SIGNATURE_INVALID');
    expect(check(r, 'anchor.label-write')?.ok).toBe(true);
    expect(r.wrap.throwaway).toHaveLength(3);
    expect(r.wrap.throwaway.every((w) => !w.wrapped && w.answers.some((a) => a.includes('CKR_KEY_UNEXTRACTABLE')))).toBe(true);
    expect(r.wrap.wrappable).toBe(false);
    expect(objects(hsmOf(t))).toEqual(before);

    // With the vault's keys on the token, each is tried too, and each is refused.
    const v = await openVault({ hsm: hsmOf(t), dbPath: join(tempDir(), 'v.db'), createKeys: true, log, vault: { kdfFloor: TEST_KDF } });
    v.store.close();
    await v.keys.close();
    const after = inspectModule(hsmOf(t), { vaultKeys: true });
    expect(after.wrap.vaultKeys.map((w) => w.key)).toEqual(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.tenant', 'bkv.seal.000001']);
    expect(after.wrap.vaultKeys.every((w) => !w.wrapped)).toBe(true);
  });
});

describe('capability check and quirks on NSS softoken', () => {
  it('measures what NSS does: data objects refused, CKR_DEVICE_ERROR for a wrong MAC, never-extractable keys wrapped out', () => {
    const t = token('nss');
    const before = objects(hsmOf(t));
    const r = inspectModule(hsmOf(t));
    expect(r.missing).toEqual([]);
    expect(r.module.library).toContain('NSS');
    expect(r.module.libraryParameters).toBe(true);
    expect(r.quirks).toEqual({ verify: 'sign-compare', anchor: 'key', template: 'full', keyPhase: 'not-cloneable' });
    expect(check(r, 'anchor.data-object')).toMatchObject({ ok: false, answer: `CKR_ATTRIBUTE_VALUE_INVALID (0x${CKR.ATTRIBUTE_VALUE_INVALID.toString(16)})` });
    expect(check(r, 'anchor.label-write')?.ok).toBe(true);
    expect(check(r, 'hmac.verify-mismatch')?.answer).toBe('CKR_DEVICE_ERROR (0x30)');
    expect(r.wrap.wrappable).toBe(true);
    expect(r.wrap.throwaway.filter((w) => w.wrapped).length).toBeGreaterThan(0);
    expect(objects(hsmOf(t))).toEqual(before);
  });

  it('a wrong password is a counted guess on NSS, on the main thread and on HSM workers; forcing C_Verify would make it HSM_UNAVAILABLE', async () => {
    const t = token('nss');
    const dbPath = join(tempDir(), 'v.db');
    const open = (o: { hsmWorkers?: boolean; quirks?: TokenConfig['quirks'] } = {}) =>
      openVault({
        hsm: { ...hsmOf(t), ...(o.quirks ? { quirks: o.quirks } : {}) },
        dbPath,
        createKeys: true,
        log,
        vault: { kdfFloor: TEST_KDF },
        ...(o.hsmWorkers ? { hsmWorkers: { threads: 1, controlThread: false } } : {}),
      });
    let v = await open();
    const k = new Uint8Array(randomBytes(32));
    await enroll(v, 'nss-user', 'right', k);
    expect(await recover(v, 'nss-user', 'wrong')).toEqual({ outcome: 'wrong-password', attemptsLeft: 9 });
    // The anchor lives in two secret keys: no data object on the token.
    const tok = Token.open(hsmOf(t));
    try {
      expect(tok.objects().filter((o) => o.cls === 'data')).toEqual([]);
      for (const slot of ANCHOR.slots) expect(tok.findKeyById(slot)).toHaveLength(1);
    } finally {
      tok.close();
    }
    v.store.close();
    await v.keys.close();

    v = await open({ hsmWorkers: true });
    expect(await recover(v, 'nss-user', 'wrong again')).toEqual({ outcome: 'wrong-password', attemptsLeft: 8 });
    const r = await recover(v, 'nss-user', 'right');
    expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
    v.store.close();
    await v.keys.close();

    // Control: the quirk is what makes it a guess. Told to trust C_Verify, NSS's answer to
    // the start-up self-test's wrong MAC reads as a lost session: the vault does not open,
    // where it would otherwise answer every wrong password with HSM_UNAVAILABLE.
    expect(await codeOf(open({ quirks: { verify: 'verify', anchor: 'key', template: 'full', keyPhase: 'not-cloneable' } }))).toBe(ErrorCodes.HSM_UNAVAILABLE);
    v = await open();
    expect(v.status('nss-user').attemptsLeft).toBe(10);
    v.store.close();
    await v.keys.close();
  });

  function nssConfig(t: TestToken, extra: object = {}) {
    const dir = tempDir();
    const pinFile = join(dir, 'pin');
    writeFileSync(pinFile, t.pin, { mode: 0o600 });
    const file = join(dir, 'config.json');
    writeFileSync(
      file,
      JSON.stringify({
        dataDir: join(dir, 'data'),
        hsm: { module: t.modulePath, tokenLabel: t.label, pinFile, libraryParameters: t.libraryParameters, ...extra },
        vault: { kdfFloor: { m: 64, t: 1, p: 1 } },
      }),
    );
    return { file, dir, c: loadConfig({ file, env: {} }) };
  }

  it('init refuses wrappable keys before creating anything; with hsm.acceptWrappableKeys it makes the vault, and status says not conform, accepted', async () => {
    const t = token('nss');
    const before = objects(hsmOf(t));
    const refused = nssConfig(t);
    const e = await initVault(refused.c, log).then(
      () => undefined,
      (x: unknown) => x as { code: string; message: string },
    );
    expect(e?.code).toBe(ErrorCodes.HSM_POLICY_VIOLATION);
    expect(e?.message).toMatch(/wrapped.*acceptWrappableKeys/s);
    expect(objects(hsmOf(t))).toEqual(before);

    const accepted = nssConfig(t, { acceptWrappableKeys: true });
    const r = await initVault(accepted.c, log);
    expect(r.createdKeys).toContain('bkv.kx');
    const s = await offlineStatus(accepted.c, log);
    expect(s.policy.conform).toBe(false);
    expect(s.policy.wrappable).toMatchObject({ wrappable: true, accepted: true });
    expect(s.policy.problem).toContain('served only because hsm.acceptWrappableKeys is set');
    expect(s.anchor?.consistent).toBe(true);
  });

  it('bkv-admin hsm check prints the table for SoftHSM2 and NSS, and --json; exit 4 while NSS keys are wrappable and not accepted', () => {
    const n = token('nss');
    const { file } = nssConfig(n);
    // The CLI is a separate process: NSS's standalone parameters open this one database.
    const env = { ...process.env, BKV_HSM_LIBRARY_PARAMETERS: nssStandalone(n) };
    const text = spawnSync(process.execPath, [ADMIN, 'hsm', 'check', '--config', file], { env, encoding: 'utf8' });
    expect(text.status).toBe(4);
    expect(text.stdout).toMatch(/CKM_ECDH1_DERIVE\s+required\s+256\.\.521\s+ok \(DERIVE/);
    expect(text.stdout).toMatch(/hmac\.verify-mismatch\s+ok\s+CKR_DEVICE_ERROR \(0x30\)/);
    expect(text.stdout).toMatch(/anchor\.data-object\s+handled\s+CKR_ATTRIBUTE_VALUE_INVALID/);
    expect(text.stdout).toContain('WRAPPED OUT');
    expect(text.stdout).toContain('verdict  REFUSED: keys can be wrapped out');
    const json = spawnSync(process.execPath, [ADMIN, 'hsm', 'check', '--config', file, '--json'], {
      env: { ...env, BKV_HSM_ACCEPT_WRAPPABLE_KEYS: '1' },
      encoding: 'utf8',
    });
    expect(json.status).toBe(0);
    const j = JSON.parse(json.stdout) as CapabilityReport & { verdict: Record<string, boolean> };
    expect(j.verdict).toEqual({ usable: true, wrappable: true, accepted: true, serves: true });
    expect(j.quirks.anchor).toBe('key');

    const s = token('softhsm');
    const dir = tempDir();
    writeFileSync(join(dir, 'pin'), s.pin, { mode: 0o600 });
    writeFileSync(join(dir, 'c.json'), JSON.stringify({ dataDir: join(dir, 'data'), hsm: { module: s.modulePath, tokenLabel: s.label, pinFile: join(dir, 'pin') } }));
    const soft = execFileSync(process.execPath, [ADMIN, 'hsm', 'check', '--config', join(dir, 'c.json')], { env: s.env, encoding: 'utf8' });
    expect(soft).toContain('SoftHSM');
    expect(soft).toMatch(/hmac\.verify-mismatch\s+ok\s+CKR_OK/);
    expect(soft).toContain('verdict  usable: every capability the vault needs is present');
  });
});

describe('a failed init leaves no half-made key set', () => {
  it('key creation failing half-way (the tenant key refused) destroys the keys made before it (real SoftHSM2)', () => {
    const t = token('softhsm');
    const real = Token.open(hsmOf(t));
    try {
      const failing = new Proxy(real, {
        get(target, prop) {
          if (prop === 'generateSecretKey') {
            return (...a: Parameters<Token['generateSecretKey']>) => {
              if (a[0] === 'bkv.tenant') throw Object.assign(new Error('CKR_DEVICE_MEMORY:49'), { code: 0x31 });
              return target.generateSecretKey(...a);
            };
          }
          const v = Reflect.get(target, prop, target) as unknown;
          return typeof v === 'function' ? (v as (...x: unknown[]) => unknown).bind(target) : v;
        },
      });
      expect(() => enforcePolicy(failing, { create: true })).toThrow();
      // kx, sig, oprf and the verifier were made, then destroyed again.
      expect(real.objects()).toEqual([]);
      // Control: without the failure the same call makes the whole set.
      expect(enforcePolicy(real, { create: true }).created).toContain('bkv.tenant');
      expect(real.objects().length).toBeGreaterThan(8);
    } finally {
      real.close();
    }
  });
});

describe('errors name the cause', () => {
  it('a failed call names the function, the CKR code, the key label and the mechanism (real SoftHSM2)', async () => {
    const t = token('softhsm');
    const v = await openVault({ hsm: hsmOf(t), dbPath: join(tempDir(), 'v.db'), createKeys: true, log, vault: { kdfFloor: TEST_KDF } });
    v.store.close();
    await v.keys.close();
    const tok = Token.open(hsmOf(t));
    try {
      const [kx] = tok.find('private', 'bkv.kx');
      let message = '';
      try {
        tok.hmacSha256(kx!, Buffer.from('x'));
      } catch (e) {
        message = (e as Error).message;
      }
      expect(message).toMatch(/^HSM operation C_Sign: CKR_KEY_\w+ \(0x[0-9a-f]+\); key "bkv\.kx", mechanism CKM_SHA256_HMAC/);
    } finally {
      tok.close();
    }
  });

  it('NSS without hsm.libraryParameters: C_Initialize by name, with the hint to set them', () => {
    const n = token('nss');
    const dir = tempDir();
    writeFileSync(join(dir, 'pin'), n.pin, { mode: 0o600 });
    writeFileSync(join(dir, 'c.json'), JSON.stringify({ dataDir: join(dir, 'data'), hsm: { module: n.modulePath, tokenLabel: n.label, pinFile: join(dir, 'pin') } }));
    const r = spawnSync(process.execPath, [ADMIN, 'hsm', 'check', '--config', join(dir, 'c.json')], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('C_Initialize: CKR_ARGUMENTS_BAD (0x7)');
    expect(r.stderr).toContain('set hsm.libraryParameters');
  });
});

describe('the daemon on NSS softoken, through hsm.module', () => {
  it('refuses to start while its keys are wrappable; with BKV_HSM_ACCEPT_WRAPPABLE_KEYS=1 it serves and says so in status and metrics', async () => {
    const n = makeNssToken();
    tokens.push({ ...n, conf: n.dir, soPin: '', module: 'nss' } as TestToken);
    const dir = tempDir();
    writeFileSync(join(dir, 'pin'), n.pin, { mode: 0o600 });
    const config = { ...TEST_CONFIG, hsm: { module: n.modulePath, tokenLabel: n.label, pinFile: join(dir, 'pin'), libraryParameters: n.standaloneParameters } };
    const before = objects({ modulePath: n.modulePath, tokenLabel: n.label, pin: n.pin, libraryParameters: n.libraryParameters });
    for (const sub of ['refused', 'accepted']) mkdirSync(join(dir, sub));
    await expect(startDaemon({ config, dataDir: join(dir, 'refused') })).rejects.toThrow(/init refused: this module lets keys marked never-extractable leave the token wrapped.*acceptWrappableKeys/s);
    expect(objects({ modulePath: n.modulePath, tokenLabel: n.label, pin: n.pin, libraryParameters: n.libraryParameters })).toEqual(before);

    const d = await startDaemon({ config, dataDir: join(dir, 'accepted'), env: { BKV_HSM_ACCEPT_WRAPPABLE_KEYS: '1' } });
    try {
      expect(d.logs.some((l) => l.includes('"event":"hsm.keys.wrappable"'))).toBe(true);
      const st = spawnSync(process.execPath, [ADMIN, 'status', '--json', '--config', join(d.dataDir, 'test-config.json'), '--data', d.dataDir], { encoding: 'utf8' });
      expect(st.status).toBe(4);
      const s = JSON.parse(st.stdout) as { policy: { conform: boolean; wrappable: { accepted: boolean } }; hsm: { check: CapabilityReport } };
      expect(s.policy.conform).toBe(false);
      expect(s.policy.wrappable.accepted).toBe(true);
      expect(s.hsm.check.quirks).toMatchObject({ verify: 'sign-compare', anchor: 'key' });
      const text = spawnSync(process.execPath, [ADMIN, 'status', '--config', join(d.dataDir, 'test-config.json'), '--data', d.dataDir], { encoding: 'utf8' });
      expect(text.stdout).toContain('keys     policy-conform: NO');
      expect(text.stdout).toContain('keys can leave the HSM wrapped: YES (ACCEPTED by hsm.acceptWrappableKeys');
      const { url } = JSON.parse(readFileSync(join(d.dataDir, 'admin.json'), 'utf8')) as { url: string };
      const metrics = await (await fetch(`${url}/metrics`)).text();
      expect(metrics).toMatch(/^bkv_hsm_keys_wrappable 1$/m);
      expect(metrics).toMatch(/^bkv_hsm_wrappable_keys_accepted 1$/m);
    } finally {
      await d.cleanup();
    }
  });
});

/** The NSS parameters a separate process uses to open this token alone (test/helpers/nss.ts). */
function nssStandalone(t: TestToken): string {
  return `configdir='sql:${t.conf}' certPrefix='' keyPrefix='' secmod='secmod.db' flags= dbTokenDescription='${t.label}'`;
}

// ---- modules this machine does not have: a double at the seam ----------------------

/** The real token, with mechanisms hidden and templates refused as `like` does (COHORT.md measurements). */
function lookalike(like: 'opencryptoki-3.8' | 'tpm2-pkcs11-1.9', seen?: { report?: CapabilityReport }) {
  const hidden =
    like === 'opencryptoki-3.8'
      ? ['CKM_EC_KEY_PAIR_GEN', 'CKM_ECDH1_DERIVE', 'CKM_ECDSA', 'CKM_AES_GCM', 'CKM_AES_KEY_WRAP_PAD']
      : ['CKM_ECDH1_DERIVE', 'CKM_AES_GCM', 'CKM_GENERIC_SECRET_KEY_GEN'];
  return (cfg: TokenConfig, o: { vaultKeys?: boolean } = {}): CapabilityReport => {
    const real = Token.open(cfg);
    try {
      const double = new Proxy(real, {
        get(target, prop) {
          if (prop === 'mechanismInfo') return (name: string) => (hidden.includes(name) ? undefined : target.mechanismInfo(name));
          // tpm2-pkcs11 answers CKR_GENERAL_ERROR to EC templates that state false usage flags.
          if (prop === 'generateEcKeyPair' && like === 'tpm2-pkcs11-1.9') {
            return (...a: Parameters<Token['generateEcKeyPair']>) => {
              if ((a[3]?.template ?? target.quirks.template) === 'full') throw Object.assign(new Error('CKR_GENERAL_ERROR:5'), { code: CKR.GENERAL_ERROR });
              return target.generateEcKeyPair(...a);
            };
          }
          const v = Reflect.get(target, prop, target) as unknown;
          return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
        },
      });
      const report = inspectToken(double, cfg, o);
      if (seen) seen.report = report;
      return report;
    } finally {
      real.close();
    }
  };
}

describe('init on modules that lack what the vault needs (test double at the capability seam)', () => {
  for (const [like, names] of [
    ['opencryptoki-3.8', ['CKM_EC_KEY_PAIR_GEN', 'CKM_ECDH1_DERIVE', 'CKM_ECDSA', 'CKM_AES_GCM']],
    ['tpm2-pkcs11-1.9', ['CKM_ECDH1_DERIVE', 'CKM_AES_GCM', 'CKM_GENERIC_SECRET_KEY_GEN']],
  ] as const) {
    it(`${like}: init refuses before creating anything and names ${names.join(', ')}`, async () => {
      const t = token('softhsm');
      const dir = tempDir();
      writeFileSync(join(dir, 'pin'), t.pin, { mode: 0o600 });
      const c = loadConfig({ env: {}, overrides: { dataDir: join(dir, 'data'), hsm: { module: t.modulePath, tokenLabel: t.label, pinFile: join(dir, 'pin') } } });
      const seen: { report?: CapabilityReport } = {};
      const e = await initVault(c, log, { inspect: lookalike(like, seen) }).then(
        () => undefined,
        (x: unknown) => x as { code: string; message: string },
      );
      expect(e?.code).toBe(ErrorCodes.HSM_ERROR);
      for (const n of names) expect(e?.message).toContain(`${n} (not supported by this module)`);
      expect(e?.message).toContain('Nothing was created');
      expect(objects(hsmOf(t))).toEqual([]);
      if (like === 'tpm2-pkcs11-1.9') {
        // The template quirk was learned, not refused: a minimal EC template worked.
        expect(seen.report?.quirks.template).toBe('minimal');
        expect(check(seen.report!, 'template.ec')).toMatchObject({ ok: true });
        expect(check(seen.report!, 'template.ec')?.detail).toContain('CKR_GENERAL_ERROR (0x5)');
      } else expect(seen.report?.quirks.template).toBe('full');
    });
  }
});
