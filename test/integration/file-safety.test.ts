// Files the CLI, the daemon and bkv-admin write are never written through a
// name someone else planted (docs/SECURITY.md F10), and are private (F11).
//
// - bkv backup restore/create: a symlink or a file planted at OUT.partial (the
//   old fixed temporary name) or at OUT itself is never written through; its
//   target stays as it was; a failed restore leaves nothing behind.
// - the daemon's and bkv-admin's files (tokens, PINs, keys, config, audit log,
//   database): dangling links planted at their names are replaced or refused,
//   never followed, and every file is created 0600 even in a 0755 folder.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { main, ExitCodes } from '../../client/cli.js';
import { DAEMON, ADMIN, TEST_CONFIG, startDaemon } from '../helpers/daemon.js';

let dir: string;
const MiB = 1024 * 1024;
const plain = randomBytes(3 * MiB + 123);

function io(stdin = '') {
  const out: string[] = [];
  const err: string[] = [];
  return {
    out,
    err,
    io: {
      stdin: Readable.from(stdin ? [Buffer.from(stdin)] : []),
      stdout: { write: (s: string) => out.push(s) },
      stderr: { write: (s: string) => err.push(s) },
      env: {},
    },
  };
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'bkv-files-'));
  writeFileSync(join(dir, 'plain.bin'), plain);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A folder with a backup in it (made with --print-key) and its code. */
async function backupIn(sub: string): Promise<{ d: string; bkv: string; code: string }> {
  const d = join(dir, sub);
  mkdirSync(d);
  const bkv = join(d, 'b.bkv');
  const c = io();
  expect(await main(['backup', 'create', '--in', join(dir, 'plain.bin'), '--out', bkv, '--print-key'], c.io)).toBe(0);
  return { d, bkv, code: c.out.join('').trim() };
}

/** A file outside the output folder that someone wants the plaintext in: empty until written through. */
function victim(name: string): string {
  const v = join(dir, `victim-${name}`);
  writeFileSync(v, '');
  chmodSync(v, 0o666);
  return v;
}

describe('bkv backup restore/create never write through a planted name', () => {
  it('a symlink at OUT.partial: restore writes OUT, its target stays empty', async () => {
    const { d, bkv, code } = await backupIn('link-partial');
    const out = join(d, 'restored');
    const v = victim('link-partial');
    symlinkSync(v, `${out}.partial`);
    expect(await main(['backup', 'restore', '--in', bkv, '--out', out, '--key', code], io().io)).toBe(0);
    expect(readFileSync(v).length).toBe(0);
    expect(Buffer.compare(readFileSync(out), plain)).toBe(0);
    expect(lstatSync(out).isFile()).toBe(true);
    expect(statSync(out).mode & 0o777).toBe(0o600);
    // Nothing else appeared: the planted link is left as it was, no temporary file remains.
    expect(readdirSync(d).sort()).toEqual(['b.bkv', 'restored', 'restored.partial']);
    expect(lstatSync(`${out}.partial`).isSymbolicLink()).toBe(true);
  });

  it('a regular file at OUT.partial (someone else\'s, mode 0666): it is neither truncated nor written', async () => {
    const { d, bkv, code } = await backupIn('file-partial');
    const out = join(d, 'restored');
    writeFileSync(`${out}.partial`, 'planted');
    chmodSync(`${out}.partial`, 0o666);
    expect(await main(['backup', 'restore', '--in', bkv, '--out', out, '--key', code], io().io)).toBe(0);
    expect(readFileSync(`${out}.partial`, 'utf8')).toBe('planted');
    expect(Buffer.compare(readFileSync(out), plain)).toBe(0);
  });

  it('a restore that fails after the first authenticated MiB leaves nothing behind, and nothing in the link\'s target', async () => {
    const { d, bkv, code } = await backupIn('failed');
    // The last chunk tampered: the first three 1 MiB chunks authenticate and are written before the failure.
    const bad = join(d, 'bad.bkv');
    const bytes = readFileSync(bkv);
    bytes[bytes.length - 5]! ^= 1;
    writeFileSync(bad, bytes);
    const out = join(d, 'restored');
    const v = victim('failed');
    symlinkSync(v, `${out}.partial`);
    const before = readdirSync(d).sort();
    expect(await main(['backup', 'restore', '--in', bad, '--out', out, '--key', code], io().io)).toBe(ExitCodes.CORRUPTED);
    expect(readFileSync(v).length).toBe(0);
    expect(readdirSync(d).sort()).toEqual(before);
    expect(existsSync(out)).toBe(false);
  });

  it('a symlink at OUT: refused without --force; with it the link is replaced, its target untouched', async () => {
    const { d, bkv, code } = await backupIn('link-out');
    const out = join(d, 'restored');
    const v = join(dir, 'victim-link-out-dangling');
    symlinkSync(v, out); // dangling: writing through it would create the victim's file
    expect(await main(['backup', 'restore', '--in', bkv, '--out', out, '--key', code], io().io)).toBe(ExitCodes.USAGE);
    expect(existsSync(v)).toBe(false);
    expect(await main(['backup', 'restore', '--in', bkv, '--out', out, '--key', code, '--force'], io().io)).toBe(0);
    expect(existsSync(v)).toBe(false);
    expect(lstatSync(out).isFile()).toBe(true);
    expect(Buffer.compare(readFileSync(out), plain)).toBe(0);
  });

  it('backup create: a symlink at OUT.partial is not written through either', async () => {
    const d = join(dir, 'create');
    mkdirSync(d);
    const out = join(d, 'x.bkv');
    const v = victim('create');
    symlinkSync(v, `${out}.partial`);
    const c = io();
    expect(await main(['backup', 'create', '--in', join(dir, 'plain.bin'), '--out', out, '--print-key'], c.io)).toBe(0);
    expect(readFileSync(v).length).toBe(0);
    expect(statSync(out).mode & 0o777).toBe(0o600);
    const back = join(d, 'back');
    expect(await main(['backup', 'restore', '--in', out, '--out', back, '--key', c.out.join('').trim()], io().io)).toBe(0);
    expect(Buffer.compare(readFileSync(back), plain)).toBe(0);
  });
});

describe('the daemon and bkv-admin write their files safely', () => {
  const NAMES = ['dev-token', 'admin-token', 'admin.json', 'vault-key.pub', 'hsm-pin', 'hsm-so-pin', 'softhsm2.conf', 'vault.lock'];

  it('dangling links planted at every file a first start writes are replaced, never followed; every file is 0600 in a 0755 folder', async () => {
    const data = join(dir, 'planted-data');
    mkdirSync(data, { mode: 0o755 });
    chmodSync(data, 0o755);
    const elsewhere = join(dir, 'elsewhere');
    mkdirSync(elsewhere);
    for (const n of NAMES) symlinkSync(join(elsewhere, n), join(data, n));
    const d = await startDaemon({ dataDir: data });
    try {
      // Nothing was created through a link: the folder they pointed into is still empty.
      expect(readdirSync(elsewhere)).toEqual([]);
      for (const n of NAMES) expect([n, lstatSync(join(data, n)).isFile()]).toEqual([n, true]);
      const loose = readdirSync(data, { recursive: true, withFileTypes: true })
        .filter((e) => e.isFile() && e.name !== 'test-config.json')
        .map((e) => join(e.parentPath, e.name))
        .filter((f) => (statSync(f).mode & 0o077) !== 0);
      expect(loose).toEqual([]);
    } finally {
      await d.stop();
    }
    rmSync(data, { recursive: true, force: true });
  });

  it('a link at the audit log or at the database refuses the start; nothing is written where it points', async () => {
    const data = join(dir, 'refuse-data');
    mkdirSync(data);
    const d = await startDaemon({ dataDir: data });
    await d.stop();
    const configFile = join(data, 'test-config.json');
    writeFileSync(configFile, JSON.stringify(TEST_CONFIG));
    for (const name of ['audit.log', 'vault.db-wal']) {
      const real = join(data, name);
      if (existsSync(real)) rmSync(real);
      const target = join(dir, `victim-${name}`);
      symlinkSync(target, real);
      const r = await new Promise<{ code: number | null; err: string }>((resolve) => {
        const p = spawn(process.execPath, [DAEMON, 'serve', '--config', configFile, '--data', data, '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], {
          env: { ...process.env, SOFTHSM2_CONF: undefined },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let err = '';
        p.stderr.on('data', (b: Buffer) => (err += b.toString()));
        // A daemon that serves through the link is the failure: stop it and say so.
        p.stdout.on('data', (b: Buffer) => {
          if (b.toString().includes('"event":"listening"')) p.kill('SIGKILL');
        });
        p.once('exit', (code, signal) => resolve({ code: signal ? -1 : code, err }));
      });
      expect([name, r.code]).toEqual([name, 1]);
      expect(r.err).toMatch(/not a (regular file|link)|must be a regular file/);
      expect(existsSync(target)).toBe(false);
      rmSync(real);
    }
    // bkv-admin takes the same care: an offline command with a link at the audit log refuses too.
    rmSync(join(data, 'audit.log'), { force: true });
    symlinkSync(join(dir, 'victim-admin-audit'), join(data, 'audit.log'));
    const a = await new Promise<number | null>((resolve) => {
      const p = spawn(process.execPath, [ADMIN, 'status', '--data', data, '--config', configFile], { env: { ...process.env, SOFTHSM2_CONF: undefined }, stdio: 'ignore' });
      p.once('exit', resolve);
    });
    expect(a).not.toBe(0);
    expect(existsSync(join(dir, 'victim-admin-audit'))).toBe(false);
  });
});

describe('private by default', () => {
  it('in a data folder made 0755, every file the daemon creates is 0600; the start log, status and config check name the folder', async () => {
    const data = join(dir, 'loose');
    mkdirSync(data, { mode: 0o755 });
    chmodSync(data, 0o755);
    const d = await startDaemon({ dataDir: data });
    try {
      const entries = readdirSync(data, { recursive: true, withFileTypes: true }).map((e) => ({ path: join(e.parentPath, e.name), dir: e.isDirectory() }));
      // The helper's own config file is the test's, not the daemon's.
      const loose = entries
        .filter((e) => !e.path.endsWith('test-config.json'))
        .filter((e) => (statSync(e.path).mode & 0o777 & ~(e.dir ? 0o700 : 0o600)) !== 0)
        .map((e) => `${e.path.slice(data.length + 1)} ${(statSync(e.path).mode & 0o777).toString(8)}`);
      expect(loose).toEqual([]);
      for (const f of ['vault.db', 'vault.db-wal', 'vault.db-shm', 'audit.log', 'admin-token', 'hsm-pin']) expect([f, statSync(join(data, f)).mode & 0o777]).toEqual([f, 0o600]);
      // The folder itself is the operator's: reported, not changed.
      expect(d.logs.some((l) => l.includes('"event":"data.permissions"') && l.includes('. (mode 0755, want 0700)'))).toBe(true);
      const status = await run(ADMIN, ['status', '--json', '--data', data]);
      expect(JSON.parse(status.out).permissions).toMatchObject({ ok: false });
      expect(JSON.parse(status.out).permissions.problems).toContain('. (mode 0755, want 0700)');
    } finally {
      await d.stop();
    }
    const check = await run(ADMIN, ['config', 'check', '--data', data]);
    expect(check.code).toBe(0);
    expect(check.err).toContain('warning: dataDir: . (mode 0755, want 0700)');
    rmSync(data, { recursive: true, force: true });
  });
});

function run(file: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BKV_') && k !== 'SOFTHSM2_CONF') env[k] = v;
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [file, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    p.stderr.on('data', (b: Buffer) => (err += b.toString()));
    p.once('exit', (code) => resolve({ code, out, err }));
  });
}
