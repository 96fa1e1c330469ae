// End to end: the real daemon (its own SoftHSM2 token and SQLite file) and the
// real `bkv` CLI, both as child processes, exactly as an operator runs them.
// dist/ is built by test/global-setup.ts.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon, CLI, TEST_CONFIG, type RunningDaemon } from '../helpers/daemon.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { readVaultKey } from '../../client/cli.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { codeOf } from '../helpers/codes.js';

/** The test vault's floor; the CLI's default (64 MiB Argon2id) would only slow the tests down. */
const KDF_ENV = { BKV_KDF: '{"m":64,"t":1,"p":1}' };
const MiB = 1024 * 1024;

let d: RunningDaemon;
let dir: string;
/** Log lines of daemons that were restarted since. */
const earlierLogs: string[] = [];

beforeAll(async () => {
  d = await startDaemon();
  dir = mkdtempSync(join(tmpdir(), 'bkv-e2e-'));
});
afterAll(async () => {
  await d?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}
const outputs: Run[] = [];

/** Run `bkv args...` against the current daemon, feeding `input` on stdin. */
function bkv(args: string[], input = '', env: NodeJS.ProcessEnv = { ...d.cliEnv, ...KDF_ENV }): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    p.stdout.on('data', (b: Buffer) => out.push(b));
    p.stderr.on('data', (b: Buffer) => err.push(b));
    p.on('error', reject);
    p.on('close', (code) => {
      const r = { code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() };
      outputs.push(r);
      resolve(r);
    });
    p.stdin.end(input);
  });
}

const sha = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const path = (name: string) => join(dir, name);
const nothingAt = (out: string) => !existsSync(out) && !existsSync(`${out}.partial`);

/** One line on stderr, no stack trace. */
function oneLine(r: Run): string {
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines).toHaveLength(1);
  expect(r.stderr).not.toMatch(/\n\s+at /);
  return lines[0]!;
}

describe('bkv against the real daemon', () => {
  it('round-trips a 20 MiB random file byte for byte with a password, reusing the escrowed key', async () => {
    const input = path('photos.tar');
    writeFileSync(input, randomBytes(20 * MiB));
    const bkvFile = path('photos.tar.bkv');

    const created = await bkv(['backup', 'create', '--in', input, '--out', bkvFile, '--user', 'alice', '--password-stdin'], 'correct horse\n');
    expect(created).toMatchObject({ code: 0, stderr: '' });
    expect(existsSync(`${bkvFile}.partial`)).toBe(false);
    // header + data + one tag per 1 MiB chunk: streamed, not a blob.
    expect(statSync(bkvFile).size).toBe(58 + 20 * MiB + 16 * 20);
    expect((await bkv(['vault', 'status', '--user', 'alice'])).stdout).toBe('alice: active, 10 of 10 attempts left\n');

    const restored = path('photos.restored');
    const r = await bkv(['backup', 'restore', '--in', bkvFile, '--out', restored, '--user', 'alice', '--password-stdin'], 'correct horse\r\n');
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(sha(restored)).toBe(sha(input));
    expect(existsSync(`${restored}.partial`)).toBe(false);

    // A second backup recovers and reuses alice's key: the first backup still opens with the same password.
    const second = path('notes.bkv');
    writeFileSync(path('notes.txt'), 'second backup');
    expect((await bkv(['backup', 'create', '--in', path('notes.txt'), '--out', second, '--user', 'alice', '--password-stdin'], 'correct horse\n')).code).toBe(0);
    const again = path('photos.again');
    expect((await bkv(['backup', 'restore', '--in', bkvFile, '--out', again, '--user', 'alice', '--password-stdin'], 'correct horse\n')).code).toBe(0);
    expect(sha(again)).toBe(sha(input));
    expect((await bkv(['vault', 'status', '--user', 'alice', '--json'])).stdout).toBe(
      '{"userId":"alice","state":"active","attemptsLeft":10,"attemptLimit":10}\n',
    );

    // The wrong password on create is refused too, and leaves no output.
    const denied = await bkv(['backup', 'create', '--in', input, '--out', path('x.bkv'), '--user', 'alice', '--password-stdin'], 'wrong\n');
    expect(denied.code).toBe(3);
    expect(oneLine(denied)).toBe('bkv: wrong password: 9 attempts left');
    expect(nothingAt(path('x.bkv'))).toBe(true);
  }, 120_000);

  it('counts wrong passwords down, locks after 10, and stays locked across a daemon restart', async () => {
    const input = path('diary.txt');
    writeFileSync(input, 'dear diary');
    const bkvFile = path('diary.bkv');
    expect((await bkv(['backup', 'create', '--in', input, '--out', bkvFile, '--user', 'mallory', '--password-stdin'], 'right password\n')).code).toBe(0);

    const out = path('diary.out');
    const restore = (pw: string) => bkv(['backup', 'restore', '--in', bkvFile, '--out', out, '--user', 'mallory', '--password-stdin'], `${pw}\n`);
    // One at a time, the count goes down by one per guess...
    for (let left = 9; left >= 8; left--) {
      const r = await restore(`guess ${left}`);
      expect([r.code, oneLine(r)]).toEqual([3, `bkv: wrong password: ${left} attempt${left === 1 ? '' : 's'} left`]);
    }
    // ...and seven from seven processes at once are each counted once: 1 left after them.
    const wrong = await Promise.all(Array.from({ length: 7 }, (_, i) => restore(`guess ${i}`)));
    for (const r of wrong) expect([r.code, oneLine(r)]).toEqual([3, expect.stringMatching(/^bkv: wrong password: [1-7] attempts? left$/)]);
    expect(wrong.some((r) => oneLine(r) === 'bkv: wrong password: 1 attempt left')).toBe(true);
    expect(nothingAt(out)).toBe(true);
    const tenth = await restore('guess 0');
    expect(tenth.code).toBe(4);
    expect(oneLine(tenth)).toMatch(/^bkv: record is locked/);
    // The right password no longer helps: the key is destroyed.
    expect((await restore('right password')).code).toBe(4);
    expect((await bkv(['vault', 'status', '--user', 'mallory'])).stdout).toBe('mallory: locked\n');

    earlierLogs.push(...d.logs);
    d = await d.restart();
    expect((await restore('right password')).code).toBe(4);
    expect(nothingAt(out)).toBe(true);
    expect((await bkv(['vault', 'status', '--user', 'mallory'])).stdout).toBe('mallory: locked\n');
  }, 180_000);

  it('--print-key needs no vault; --key CODE restores; a wrong code exits 7; a truncated backup exits 8', async () => {
    const noVault = { ...process.env, BKV_VAULT: 'ws://127.0.0.1:1', BKV_TOKEN: '', BKV_VAULT_KEY: '' };
    const input = path('tax.pdf');
    writeFileSync(input, randomBytes(3 * MiB + 12345));
    const bkvFile = path('tax.bkv');
    const created = await bkv(['backup', 'create', '--in', input, '--out', bkvFile, '--print-key'], '', noVault);
    expect(created.code).toBe(0);
    const code = created.stdout.trim();
    expect(code).toMatch(/^([0-9A-F]{4} ){15}[0-9A-F]{4}$/);

    const out = path('tax.out');
    expect((await bkv(['backup', 'restore', '--in', bkvFile, '--out', out, '--key', code], '', noVault)).code).toBe(0);
    expect(sha(out)).toBe(sha(input));

    const wrongCode = code.replace(/^./, (c) => (c === '0' ? '1' : '0'));
    const wrong = await bkv(['backup', 'restore', '--in', bkvFile, '--out', path('w.out'), '--key', wrongCode], '', noVault);
    expect(wrong.code).toBe(7);
    expect(oneLine(wrong)).not.toContain(code.slice(5));
    expect(nothingAt(path('w.out'))).toBe(true);

    // alice's escrowed key is not this backup's key.
    const notHers = await bkv(['backup', 'restore', '--in', bkvFile, '--out', path('a.out'), '--user', 'alice', '--password-stdin'], 'correct horse\n');
    expect([notHers.code, oneLine(notHers)]).toEqual([7, "bkv: wrong key: this user's escrowed key does not open this backup (made with another key)"]);
    expect(nothingAt(path('a.out'))).toBe(true);

    const full = readFileSync(bkvFile);
    for (const [name, bytes] of [
      ['cut-inside-chunk', full.subarray(0, full.length - 1000)],
      ['cut-at-chunk-boundary', full.subarray(0, 58 + 3 * (MiB + 16))],
      ['cut-in-header', full.subarray(0, 40)],
    ] as const) {
      writeFileSync(path(`${name}.bkv`), bytes);
      const r = await bkv(['backup', 'restore', '--in', path(`${name}.bkv`), '--out', path(`${name}.out`), '--key', code], '', noVault);
      expect([name, r.code]).toEqual([name, 8]);
      oneLine(r);
      expect([name, nothingAt(path(`${name}.out`))]).toEqual([name, true]);
    }
  }, 120_000);

  it('a bad or forged token exits 9; an unknown user exits 5; an unreachable vault exits 6; a wrong pinned key is refused', async () => {
    const withToken = (token: string) => ({ ...d.cliEnv, ...KDF_ENV, BKV_TOKEN: token });
    const garbage = await bkv(['vault', 'status', '--user', 'alice'], '', withToken('not-a-jwt'));
    expect(garbage.code).toBe(9);
    oneLine(garbage);
    // Same header and claims, another signature: a forged token.
    const [h, b] = d.token.split('.');
    const forged = `${h}.${b}.${randomBytes(32).toString('base64url')}`;
    const r = await bkv(['backup', 'restore', '--in', path('diary.bkv'), '--out', path('f.out'), '--user', 'alice', '--password-stdin'], 'pw\n', withToken(forged));
    expect(r.code).toBe(9);
    expect(oneLine(r)).not.toContain(forged);

    const ghost = await bkv(['backup', 'restore', '--in', path('diary.bkv'), '--out', path('g.out'), '--user', 'nobody', '--password-stdin'], 'pw\n');
    expect([ghost.code, oneLine(ghost)]).toEqual([5, 'bkv: no record for this user']);
    expect((await bkv(['vault', 'delete', '--user', 'nobody'])).code).toBe(5);

    const down = await bkv(['vault', 'status', '--user', 'alice'], '', { ...d.cliEnv, BKV_VAULT: 'ws://127.0.0.1:1' });
    expect(down.code).toBe(6);
    expect(oneLine(down)).toMatch(/^bkv: vault unreachable/);

    // Pinning another vault's key (here the P-256 generator): the genuine descriptor does not verify,
    // so no password-derived message is sent.
    const otherKey = path('other-key.hex');
    writeFileSync(otherKey, '04' + '6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296' + '4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5');
    const pinned = await bkv(['backup', 'restore', '--in', path('diary.bkv'), '--out', path('p.out'), '--user', 'alice', '--password-stdin'], 'correct horse\n', {
      ...d.cliEnv,
      BKV_VAULT_KEY: otherKey,
    });
    expect(pinned.code).toBe(1);
    expect(oneLine(pinned)).toMatch(/not signed by the pinned vault key/);
  }, 120_000);

  it('deletes a record, after which its user has no record', async () => {
    expect((await bkv(['vault', 'delete', '--user', 'alice'])).code).toBe(0);
    expect((await bkv(['vault', 'status', '--user', 'alice'])).stdout).toBe('alice: deleted\n');
    const r = await bkv(['backup', 'restore', '--in', path('notes.bkv'), '--out', path('n.out'), '--user', 'alice', '--password-stdin'], 'correct horse\n');
    expect(r.code).toBe(5);
  }, 60_000);

  it('never printed a password, and the daemon never logged one', () => {
    const secrets = ['correct horse', 'right password', 'guess 3'];
    for (const s of secrets) {
      for (const r of outputs) expect(r.stderr + r.stdout).not.toContain(s);
      expect([...earlierLogs, ...d.logs].join('\n')).not.toContain(s);
    }
  });
});

describe('VaultClient (in-process SDK) against the real daemon', () => {
  const kdf = { alg: 'argon2id' as const, m: 64, t: 1, p: 1 };
  function client(now?: () => number) {
    const transport = new WebSocketTransport({ url: d.url, token: d.token });
    return { transport, c: new VaultClient({ transport, pinnedKey: readVaultKey(d.vaultKeyFile), kdf, ...(now ? { now } : {}) }) };
  }
  it('enrols, refuses a second enrolment, changes the password keeping the key, and deletes', async () => {
    const { transport, c } = client();
    try {
      const key = new Uint8Array(randomBytes(32));
      expect(await c.enrollPassword('carol', 'first password', key)).toEqual({ generation: 1, attemptLimit: 10 });
      expect(await codeOf(c.enrollPassword('carol', 'other', new Uint8Array(32)))).toBe(ErrorCodes.RECORD_EXISTS);
      expect(await c.recoverWithPassword('carol', 'first password')).toEqual(key);

      expect(await c.changePassword('carol', 'first password', 'second password')).toEqual({ generation: 2, attemptLimit: 10 });
      const wrong = (await c.recoverWithPassword('carol', 'first password').catch((e: unknown) => e)) as VaultError;
      expect([wrong.code, wrong.detail]).toEqual([ErrorCodes.WRONG_PASSWORD, { attemptsLeft: 9 }]);
      expect(await c.recoverWithPassword('carol', 'second password')).toEqual(key);
      // A wrong old password changes nothing.
      expect(await codeOf(c.changePassword('carol', 'nope', 'third password'))).toBe(ErrorCodes.WRONG_PASSWORD);
      expect(await c.recoverWithPassword('carol', 'second password')).toEqual(key);

      // Re-escrow a new key under a new password.
      const key2 = new Uint8Array(randomBytes(32));
      await c.changePassword('carol', 'second password', 'third password', key2);
      expect(await c.recoverWithPassword('carol', 'third password')).toEqual(key2);

      expect(await c.status('carol')).toEqual({ userId: 'carol', state: 'active', attemptsLeft: 10, attemptLimit: 10 });
      await c.delete('carol');
      expect((await c.status('carol')).state).toBe('deleted');
      expect(await codeOf(c.recoverWithPassword('carol', 'third password'))).toBe(ErrorCodes.RECORD_NOT_FOUND);
    } finally {
      transport.close();
    }
  }, 60_000);

  it('resynchronises a stale handshake with the clock the vault reports', async () => {
    let skew = 0;
    const { transport, c } = client(() => Date.now() + skew);
    try {
      await c.descriptor(); // offset learned with the right clock...
      skew = 10 * 60_000; // ...then the local clock jumps ten minutes ahead.
      const key = new Uint8Array(randomBytes(32));
      await c.enrollPassword('dave', 'pw', key);
      expect(await c.recoverWithPassword('dave', 'pw')).toEqual(key);
    } finally {
      transport.close();
    }
  }, 60_000);
});

describe('rate limits', () => {
  let limited: RunningDaemon;
  beforeAll(async () => {
    // One request per user, refilled every 0.5 s: the messages of one flow come milliseconds
    // apart, so every second one is refused at first.
    limited = await startDaemon({ config: { ...TEST_CONFIG, limits: { userBurst: 1, userPerMin: 120 } } });
  });
  afterAll(async () => {
    await limited?.cleanup();
  });

  it('retries RATE_LIMITED messages as the vault asks, resending the channel message unchanged', async () => {
    writeFileSync(path('small.txt'), 'small');
    const env = { ...limited.cliEnv, ...KDF_ENV };
    const user = ['--user', 'erin', '--password-stdin'];
    expect((await bkv(['backup', 'create', '--in', path('small.txt'), '--out', path('small.bkv'), ...user], 'pw\n', env)).code).toBe(0);
    const back = path('small.out');
    expect((await bkv(['backup', 'restore', '--in', path('small.bkv'), '--out', back, ...user], 'pw\n', env)).code).toBe(0);
    expect(readFileSync(back, 'utf8')).toBe('small');
    await new Promise((r) => setTimeout(r, 200)); // let the last log lines arrive
    expect(limited.logs.some((l) => l.includes('"outcome":"RATE_LIMITED"'))).toBe(true);
  }, 60_000);
});
