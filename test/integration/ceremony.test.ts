// The whole key ceremony between two real SoftHSM2 tokens (each the embedded
// token of its own data folder), every step a separate `bkv-admin` process as
// an operator would run it, and two real daemons: a record enrolled through
// node A recovers through node B, B's descriptor verifies against the key
// pinned from A, and wrong guesses behave alike. Every refusal (daemon running,
// missing SO PIN, wrong fingerprint, wrong target, tampered bundle, a bundle of
// another vault than the one named) gets its code and leaves the token's object
// list as it was (test/integration/ceremony-steps.test.ts has the library-level cases).
// After the seal, no key leaves, not even under a key the SO marks trusted.
//
// The tests in this file run in order and build on each other, like the ceremony.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ADMIN, CLI, startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { SecurityOfficer, Token } from '../../vault/hsm/token.js';
import { CKR } from '../../vault/hsm/ckr.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { KEY_SET, sealLabel } from '../../hsm-policy/policy.js';
import { loadConfig, hsmSettings } from '../../vault/config.js';
import { prepareEmbedded } from '../../vault/setup.js';
import { initToken } from '../../vault/hsm/token.js';
import { labelledKeys } from '../../vault/ceremony/steps.js';
import { SOFTHSM_MODULE } from '../helpers/softhsm.js';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Environment without the test runner's BKV_* or SOFTHSM2_CONF: each data folder brings its own. */
function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const e: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BKV_') && k !== 'SOFTHSM2_CONF') e[k] = v;
  return { ...e, ...extra };
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv, input = ''): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [file, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    p.stdout.on('data', (b: Buffer) => out.push(b));
    p.stderr.on('data', (b: Buffer) => err.push(b));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
    p.stdin.end(input);
  });
}

const admin = (data: string, ...args: string[]) => run(ADMIN, [...args, '--data', data], cleanEnv());
const KDF_ENV = { BKV_KDF: '{"m":64,"t":1,"p":1}' };
const bkv = (d: RunningDaemon, args: string[], input: string, pinned: string) =>
  run(CLI, args, { ...cleanEnv(KDF_ENV), BKV_VAULT: d.url, BKV_TOKEN: d.token, BKV_VAULT_KEY: pinned }, input);

/** A refused step: exit 7 and its CEREMONY_* code on stderr. */
function expectRefused(r: Run, code: string): void {
  expect({ exit: r.code, stderr: r.stderr }).toMatchObject({ exit: 7, stderr: expect.stringContaining(`bkv-admin: ${code}: `) });
}

/** Open a data folder's embedded token in this process (no daemon may run on it). */
function withToken<R>(data: string, fn: (tok: Token) => R): R {
  process.env.SOFTHSM2_CONF = join(data, 'softhsm2.conf');
  const tok = Token.open({ modulePath: SOFTHSM_MODULE, tokenLabel: 'bkv-embedded', pin: readFileSync(join(data, 'hsm-pin'), 'utf8').trim() });
  try {
    return fn(tok);
  } finally {
    tok.close(); // the last Token: the library is finalised, so the next conf is read afresh
    delete process.env.SOFTHSM2_CONF;
  }
}

/** The token's whole object list, with each key's extractability: what a refused step must not change. */
const objects = (data: string): string[] =>
  withToken(data, (tok) =>
    tok
      .objects()
      .map((o) => `${o.cls} ${o.label}${o.cls === 'private' || o.cls === 'secret' ? (tok.attributes(o.handle).extractable ? ' extractable' : ' sealed') : ''}`)
      .sort(),
  );

const fingerprintOf = (targetFile: string): string => (JSON.parse(readFileSync(targetFile, 'utf8')) as { fingerprint: string }).fingerprint;

let work: string;
let A: string; // the source vault
let B: string; // the new HSM: its clone
let T2: string; // another would-be target
let dA: RunningDaemon | undefined;
let dB: RunningDaemon | undefined;
let vaultId: string;
const targetB = () => join(B, 'ceremony-target.json');
const bundleB = () => join(work, 'a-for-b.json');

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'bkv-ceremony-'));
  A = join(work, 'A');
  B = join(work, 'B');
  T2 = join(work, 'T2');
  writeFileSync(join(work, 'chats.db'), randomBytes(20_000));
  mkdirSync(A);
  dA = await startDaemon({ dataDir: A });
  vaultId = (JSON.parse((await admin(A, 'status', '--json')).stdout) as { vaultId: string }).vaultId;
  // Two users enrolled on A before the clone; bob only ever guesses wrong.
  for (const [user, pw] of [['alice', 'alice pw'], ['bob', 'bob pw']] as const) {
    const r = await bkv(dA, ['backup', 'create', '--in', join(work, 'chats.db'), '--out', join(work, `${user}.bkv`), '--user', user, '--password-stdin'], `${pw}\n`, join(A, 'vault-key.pub'));
    expect(r.code, r.stderr).toBe(0);
  }
});

afterAll(async () => {
  await dA?.stop();
  await dB?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('the key ceremony between two HSMs, step by step', () => {
  it('a new vault is open for cloning, and status says so', async () => {
    const s = JSON.parse((await admin(A, 'status', '--json')).stdout);
    expect(s.policy).toMatchObject({ conform: true, phase: 'open', ceremony: { trusted: [], transport: [] } });
    expect(s.policy.keyPhases.map((k: { phase: string }) => k.phase)).toEqual(Array(6).fill('open'));
  });

  it('target-init on the new HSM: an unwrap key made inside it, a public target file, a fingerprint to compare', async () => {
    const [b, t2] = await Promise.all([admin(B, 'ceremony', 'target-init'), admin(T2, 'ceremony', 'target-init')]);
    expect(b.code, b.stderr).toBe(0);
    expect(t2.code, t2.stderr).toBe(0);
    const fp = fingerprintOf(targetB());
    expect(b.stdout).toContain(fp.match(/.{4}/g)!.join(' '));
    expect(objects(B)).toEqual(['private bkv.ceremony.unwrap sealed', 'public bkv.ceremony.unwrap']);
  });

  it('trust refuses while the daemon owns the token, without the SO PIN, and with a fingerprint that is not the file\'s; none changes anything', async () => {
    const fp = fingerprintOf(targetB());
    expectRefused(await admin(A, 'ceremony', 'trust', '--target', targetB(), '--fingerprint', fp), 'CEREMONY_DAEMON_RUNNING');
    await dA!.stop();
    const before = objects(A);
    const soPin = join(A, 'hsm-so-pin');
    renameSync(soPin, soPin + '.away');
    try {
      const r = await admin(A, 'ceremony', 'trust', '--target', targetB(), '--fingerprint', fp);
      expectRefused(r, 'CEREMONY_SO_PIN_MISSING');
      expect(r.stderr).toMatch(/hsm\.soPinFile/);
    } finally {
      renameSync(soPin + '.away', soPin);
    }
    expect(objects(A)).toEqual(before);
    const wrongFp = fingerprintOf(join(T2, 'ceremony-target.json'));
    expectRefused(await admin(A, 'ceremony', 'trust', '--target', targetB(), '--fingerprint', wrongFp), 'CEREMONY_FINGERPRINT_MISMATCH');
    expect(objects(A)).toEqual(before);

    const ok = await admin(A, 'ceremony', 'trust', '--target', targetB(), '--fingerprint', fp.match(/.{4}/g)!.join(' '));
    expect(ok.code, ok.stderr).toBe(0);
    const label = fp.slice(0, 16);
    expect(objects(A)).toEqual([...before, `public bkv.ceremony.trust.${label}`, `secret bkv.ceremony.transport.${label} extractable`].sort());
  });

  it('export refuses a target not trusted here (CEREMONY_WRONG_TARGET), then wraps every key for B', async () => {
    const before = objects(A);
    expectRefused(await admin(A, 'ceremony', 'export', '--target', join(T2, 'ceremony-target.json'), '--out', join(work, 'nope.json')), 'CEREMONY_WRONG_TARGET');
    expect(existsSync(join(work, 'nope.json'))).toBe(false);
    expect(objects(A)).toEqual(before);

    const r = await admin(A, 'ceremony', 'export', '--target', targetB(), '--out', bundleB());
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/anchor +included/);
    // The transport key went into the bundle and is gone; the trusted public key stays until the seal.
    expect(objects(A)).toEqual(before.filter((o) => !o.includes('transport')));
    const b = JSON.parse(readFileSync(bundleB(), 'utf8'));
    expect(b).toMatchObject({ kind: 'full', vaultId, target: fingerprintOf(targetB()) });
    expect(b.keys.map((k: { label: string; wrap: string }) => `${k.label}:${k.wrap}`)).toEqual([
      'bkv.kx:aes-key-wrap-pad',
      'bkv.sig:aes-key-wrap-pad',
      'bkv.oprf:aes-key-wrap-pad',
      'bkv.verifier:rsa-oaep',
      'bkv.tenant:rsa-oaep',
      'bkv.seal.000001:rsa-oaep',
    ]);
    // The daemon is stopped, so its database matches the anchor in the bundle: B gets a copy of both.
    for (const f of ['vault.db', 'vault.db-wal', 'vault.db-shm']) if (existsSync(join(A, f))) copyFileSync(join(A, f), join(B, f));
  });

  it('import refuses a tampered bundle, a bundle of another vault than the one named, and a bundle made for another HSM; none changes anything', async () => {
    const tampered = join(work, 'tampered.json');
    const b = JSON.parse(readFileSync(bundleB(), 'utf8'));
    const blob: string = b.keys[3].blob;
    b.keys[3].blob = (blob[0] === 'A' ? 'B' : 'A') + blob.slice(1);
    writeFileSync(tampered, JSON.stringify(b));
    const otherVault = randomBytes(16).toString('hex');

    const before = objects(B);
    const beforeT2 = objects(T2);
    // One process per data folder at a time (the data lock); B's two refusals in turn, T2's beside them.
    const [[t, other], wrongHsm] = await Promise.all([
      (async () => [
        await admin(B, 'ceremony', 'import', '--bundle', tampered, '--vault-id', vaultId),
        await admin(B, 'ceremony', 'import', '--bundle', bundleB(), '--vault-id', otherVault),
      ])(),
      admin(T2, 'ceremony', 'import', '--bundle', bundleB(), '--vault-id', vaultId),
    ]);
    expectRefused(t!, 'CEREMONY_BUNDLE_TAMPERED');
    expectRefused(other!, 'CEREMONY_VAULT_MISMATCH');
    expect(other!.stderr).toContain(`holds the keys of vault ${vaultId}, not of vault ${otherVault}`);
    expectRefused(wrongHsm, 'CEREMONY_WRONG_TARGET');
    expect(objects(B)).toEqual(before);
    expect(objects(T2)).toEqual(beforeT2);
    // Each refusal is in the audit log, with its code.
    expect(readFileSync(join(B, 'audit.log'), 'utf8')).toContain('"event":"ceremony.refused","step":"import","code":"CEREMONY_BUNDLE_TAMPERED"');
  });

  it('import on B: every key unwrapped inside B and proven by the known answers; the same vault id and pinned key', async () => {
    const r = await admin(B, 'ceremony', 'import', '--bundle', bundleB(), '--vault-id', vaultId);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`vault id      ${vaultId}`);
    expect(readFileSync(join(B, 'vault-key.pub'), 'utf8')).toBe(readFileSync(join(A, 'vault-key.pub'), 'utf8'));
    const s = JSON.parse((await admin(B, 'status', '--json')).stdout);
    expect(s).toMatchObject({ vaultId, policy: { conform: true, phase: 'open' }, anchor: { consistent: true } });
    expect(new Set(s.policy.keyPhases.map((k: { origin: string }) => k.origin))).toEqual(new Set(['unwrapped by the key ceremony (a clone)']));
    const audit = await admin(B, 'audit', 'verify');
    expect(audit.code, audit.stdout).toBe(0);
    for (const ev of ['ceremony.target-init', 'ceremony.import', 'ceremony.refused']) expect(readFileSync(join(B, 'audit.log'), 'utf8')).toContain(`"event":"${ev}"`);
    for (const ev of ['ceremony.trust', 'ceremony.export']) expect(readFileSync(join(A, 'audit.log'), 'utf8')).toContain(`"event":"${ev}"`);
  });
});

describe('the clone is the same vault (two daemons)', () => {
  it('alice, enrolled through A, recovers through B; B is verified against the key pinned from A; a wrong guess reads the same on both', async () => {
    [dA, dB] = await Promise.all([startDaemon({ dataDir: A }), startDaemon({ dataDir: B })]);
    const pinnedFromA = join(A, 'vault-key.pub');
    const r = await bkv(dB, ['backup', 'restore', '--in', join(work, 'alice.bkv'), '--out', join(work, 'alice.out'), '--user', 'alice', '--password-stdin'], 'alice pw\n', pinnedFromA);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(work, 'alice.out'))).toEqual(readFileSync(join(work, 'chats.db')));

    const guess = (d: RunningDaemon) =>
      bkv(d, ['backup', 'restore', '--in', join(work, 'bob.bkv'), '--out', join(work, 'bob.out'), '--user', 'bob', '--password-stdin'], 'not bob pw\n', pinnedFromA);
    const [onA, onB] = [await guess(dA), await guess(dB)];
    expect(onA.code).toBe(3);
    expect({ code: onB.code, stderr: onB.stderr }).toEqual({ code: onA.code, stderr: onA.stderr });
    expect(onB.stderr).toMatch(/9 attempts? left/);

  });

  it('a rotation on A is cloned as that epoch alone, through A\'s running daemon, and B takes it', async () => {
    const rot = await admin(A, 'rotate');
    expect(rot.code, rot.stderr).toBe(0);
    expect(rot.stdout).toMatch(/seal epoch is now 2/);
    const sA = JSON.parse((await admin(A, 'status', '--json')).stdout);
    // Made in the vault's phase: open, so it can follow to B.
    expect(sA.policy.keyPhases.find((k: { label: string }) => k.label === sealLabel(2))).toMatchObject({ phase: 'open' });

    const epochBundle = join(work, 'epoch-2.json');
    const ex = await admin(A, 'ceremony', 'export', '--epoch', '2', '--target', targetB(), '--out', epochBundle);
    expect(ex.code, ex.stderr).toBe(0);
    expect(ex.stdout).toContain('epoch: bkv.seal.000002');
    expect(readFileSync(join(A, 'audit.log'), 'utf8')).toMatch(/"event":"ceremony.export","fingerprint":"[0-9a-f]{64}","kind":"epoch"/);

    await dB!.stop();
    const im = await admin(B, 'ceremony', 'import', '--bundle', epochBundle);
    expect(im.code, im.stderr).toBe(0);
    const sB = JSON.parse((await admin(B, 'status', '--json')).stdout);
    expect(sB).toMatchObject({ currentEpoch: 2, policy: { conform: true, phase: 'open', epochs: [1, 2] } });
  });
});

describe('after the seal nothing leaves', () => {
  it('seal on both: every key non-extractable, the ceremony\'s keys gone, status says sealed', async () => {
    await dA!.stop();
    const [a, b] = await Promise.all([admin(A, 'ceremony', 'seal'), admin(B, 'ceremony', 'seal')]);
    expect(a.code, a.stderr).toBe(0);
    expect(b.code, b.stderr).toBe(0);
    expect(b.stdout).toMatch(/removed +bkv\.ceremony\.unwrap, bkv\.ceremony\.unwrap/);
    for (const d of [A, B]) {
      expect(objects(d).filter((o) => o.includes('ceremony'))).toEqual([]);
      const s = JSON.parse((await admin(d, 'status', '--json')).stdout);
      expect(s.policy).toMatchObject({ conform: true, phase: 'sealed' });
    }
    // Trust is refused on a sealed vault, before the SO does anything.
    const before = objects(A);
    expectRefused(await admin(A, 'ceremony', 'trust', '--target', join(T2, 'ceremony-target.json'), '--fingerprint', fingerprintOf(join(T2, 'ceremony-target.json'))), 'CEREMONY_NOT_CLONEABLE');
    expect(objects(A)).toEqual(before);
  });

  it('no key can be wrapped out any more, even under keys the Security Officer just marked trusted (CKR_KEY_UNEXTRACTABLE)', () => {
    // T2 still has an unwrap key: the SO of each sealed HSM makes it trusted, plus a trusted AES key.
    const t2 = withToken(T2, (tok) => tok.rsaPublic(tok.find('public', 'bkv.ceremony.unwrap')[0]!));
    for (const d of [A, B]) {
      process.env.SOFTHSM2_CONF = join(d, 'softhsm2.conf');
      try {
        SecurityOfficer.run({ modulePath: SOFTHSM_MODULE, tokenLabel: 'bkv-embedded' }, readFileSync(join(d, 'hsm-so-pin'), 'utf8').trim(), (so) => {
          so.createTrustedRsaPublicKey('probe.trusted', t2.modulus, t2.exponent);
          so.generateTrustedTransportKey('probe.transport');
        });
      } finally {
        delete process.env.SOFTHSM2_CONF;
      }
      const codes = withToken(d, (tok) => {
        const rsa = tok.find('public', 'probe.trusted')[0]!;
        const aes = tok.find('secret', 'probe.transport')[0]!;
        expect(tok.trustedKeys().map((k) => k.label).sort()).toEqual(['probe.transport', 'probe.trusted']);
        const keys = labelledKeys(enforcePolicy(tok, { create: false }));
        const out = keys.map(({ label, handle }) => ({ label, oaep: tok.tryWrap(rsa, handle, 'rsa-oaep'), aesPad: tok.tryWrap(aes, handle) }));
        for (const h of [rsa, aes]) tok.destroy(h);
        return out;
      });
      expect(codes.map((c) => c.label)).toEqual(expect.arrayContaining(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.tenant', 'bkv.seal.000002']));
      for (const c of codes) expect(c).toEqual({ label: c.label, oaep: CKR.KEY_UNEXTRACTABLE, aesPad: CKR.KEY_UNEXTRACTABLE });
    }
  });

  it('a sealed clone still serves: alice recovers through B', async () => {
    dB = await startDaemon({ dataDir: B });
    const r = await bkv(dB, ['backup', 'restore', '--in', join(work, 'alice.bkv'), '--out', join(work, 'alice2.out'), '--user', 'alice', '--password-stdin'], 'alice pw\n', join(A, 'vault-key.pub'));
    expect(r.code, r.stderr).toBe(0);
  });
});

describe('a vault made before the ceremony existed', () => {
  it('keeps working, is reported "not cloneable", rotates in that phase, and the ceremony refuses it', async () => {
    const L = join(work, 'L');
    const c = loadConfig({ env: {}, overrides: { dataDir: L } });
    const s = hsmSettings(c);
    prepareEmbedded(s);
    const pin = randomBytes(8).toString('hex');
    const soPin = randomBytes(8).toString('hex');
    initToken(SOFTHSM_MODULE, 'bkv-embedded', soPin, pin);
    writeFileSync(join(L, 'hsm-pin'), pin, { mode: 0o600 });
    writeFileSync(join(L, 'hsm-so-pin'), soPin, { mode: 0o600 });
    // The key set exactly as the code before the ceremony made it: the generators without a protection.
    withToken(L, (tok) => {
      for (const k of KEY_SET) {
        if (k.kind === 'ec-p256') tok.generateEcKeyPair(k.label, k.usages);
        else tok.generateSecretKey(k.perEpoch ? sealLabel(1) : k.label, k.kind === 'aes-256' ? 'aes' : 'generic', 32, k.usages);
      }
      expect(enforcePolicy(tok, { create: true }).created).toEqual(['bkv.state-anchor']);
    });
    const rot = await admin(L, 'rotate');
    expect(rot.code, rot.stderr).toBe(0);
    const st = JSON.parse((await admin(L, 'status', '--json')).stdout);
    expect(st.policy).toMatchObject({ conform: true, phase: 'not-cloneable' });
    expect(st.policy.keyPhases.map((k: { label: string; phase: string }) => `${k.label} ${k.phase}`)).toContain('bkv.seal.000002 not-cloneable');
    expect((await admin(L, 'status')).stdout).toMatch(/phase +not cloneable/);

    const before = objects(L);
    const t2 = join(T2, 'ceremony-target.json');
    const r = await admin(L, 'ceremony', 'trust', '--target', t2, '--fingerprint', fingerprintOf(t2));
    expectRefused(r, 'CEREMONY_NOT_CLONEABLE');
    expect(r.stderr).toMatch(/not cloneable/);
    expect(objects(L)).toEqual(before);
  });
});
