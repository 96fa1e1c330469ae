// bkv-admin against a stopped vault (it opens the embedded SoftHSM2 token
// itself, under the data-folder lock), and snapshots of every --help so a
// changed flag or exit code is a reviewed change.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type AddressInfo } from 'node:net';
import { ADMIN, DAEMON, ROOT } from '../helpers/daemon.js';
import { acquireLock } from '../../vault/admin/lock.js';
import type { Command } from 'commander';
import { adminProgram } from '../../vault/admin.js';

let dir: string;
let data: string;
const env = (): NodeJS.ProcessEnv => {
  const e: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BKV_') && k !== 'SOFTHSM2_CONF') e[k] = v;
  return { ...e, COLUMNS: '80' };
};
const admin = (...args: string[]) => spawnSync(process.execPath, [ADMIN, ...args], { encoding: 'utf8', env: env() });

/** Another process that takes the data folder's lock the way the daemon does, and holds it until killed. */
async function holdLock(dir: string, role: string): Promise<ChildProcess> {
  const lockJs = pathToFileURL(join(ROOT, 'dist/vault/admin/lock.js')).href;
  const p = spawn(process.execPath, ['--input-type=module', '-e', `const { acquireLock } = await import(${JSON.stringify(lockJs)}); acquireLock(${JSON.stringify(dir)}, ${JSON.stringify(role)}); console.log('held'); setInterval(() => {}, 1000);`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((resolve, reject) => {
    p.stdout!.once('data', () => resolve());
    p.once('exit', (code) => reject(new Error(`lock holder exited ${code}`)));
  });
  return p;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'bkv-admin-cli-'));
  data = join(dir, 'data');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('bkv-admin against a stopped vault', () => {
  it('init creates the token, every policy key and vault-key.pub, and a second run changes nothing', () => {
    const first = admin('init', '--data', data);
    expect(first.status, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/token\s+created/);
    expect(first.stdout).toMatch(/keys created\s+bkv\.kx, bkv\.sig, bkv\.oprf, bkv\.verifier, bkv\.tenant, bkv\.seal\.000001, bkv\.state-anchor/);
    expect(existsSync(join(data, 'vault-key.pub'))).toBe(true);
    const second = admin('init', '--data', data);
    expect(second.status, second.stderr).toBe(0);
    expect(second.stdout).toMatch(/token\s+existing/);
    expect(second.stdout).toMatch(/keys created\s+none/);
    expect(first.stdout.match(/vault id\s+(\S+)/)![1]).toBe(second.stdout.match(/vault id\s+(\S+)/)![1]);
    expect(existsSync(join(data, 'vault.lock'))).toBe(false);
  });

  it('status opens the token itself: keys policy-conform, anchor consistent, epoch 1', () => {
    const r = admin('status', '--data', data, '--json');
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({
      mode: 'offline',
      policy: { conform: true },
      currentEpoch: 1,
      records: { active: 0, locked: 0, deleted: 0 },
      anchor: { consistent: true, dbSeq: 0, hsmSeq: 0 },
    });
  });

  it('tenant add/token/revoke and rotate work offline and land in the audit log, which verifies', () => {
    const add = admin('tenant', 'add', 'offline-co', '--data', data);
    expect(add.status, add.stderr).toBe(0);
    expect(add.stdout).toMatch(/^\s+[0-9a-f]{64}$/m);
    const tok = admin('tenant', 'token', 'offline-co', '--ttl', '120', '--data', data);
    expect(tok.status, tok.stderr).toBe(0);
    expect(tok.stdout.trim().split('.')).toHaveLength(3);
    expect(admin('tenant', 'token', 'offline-co', '--ttl', '10', '--data', data).status).toBe(2);
    const rot = admin('rotate', '--data', data);
    expect(rot.status, rot.stderr).toBe(0);
    expect(rot.stdout).toMatch(/seal epoch is now 2/);
    expect(admin('tenant', 'revoke', 'offline-co', '--data', data).status).toBe(0);
    const audit = readFileSync(join(data, 'audit.log'), 'utf8');
    for (const ev of ['hsm.keys.created', 'tenant.add', 'tenant.token', 'rotate.done', 'audit.checkpoint', 'tenant.revoke']) expect(audit).toContain(`"event":"${ev}"`);
    const v = admin('audit', 'verify', '--data', data);
    expect(v.status, v.stdout).toBe(0);
  });

  it('refuses to open the token while another live process holds the data folder', async () => {
    const holder = await holdLock(data, 'bkv-vault serve');
    try {
      const r = admin('status', '--data', data);
      expect(r.status).toBe(6);
      expect(r.stderr).toMatch(/in use by bkv-vault serve \(pid \d+/);
      expect(() => acquireLock(data, 'test')).toThrow(/only one process may own the HSM token/);
    } finally {
      holder.kill('SIGKILL');
      await new Promise((r) => holder.once('exit', r));
    }
    // Its owner gone (killed, nothing cleaned up), the kernel has dropped the lock.
    const lock = acquireLock(data, 'test');
    lock.release();
    expect(existsSync(join(data, 'vault.lock'))).toBe(false);
  });

  it('a daemon that announced itself but does not answer is VAULT_UNREACHABLE (exit 6), and the token stays closed', async () => {
    // Accepts connections (the kernel does, even while spawnSync blocks this process) and never answers.
    const silent = createServer(() => {});
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
    const { port } = silent.address() as AddressInfo;
    writeFileSync(join(data, 'admin.json'), JSON.stringify({ url: `http://127.0.0.1:${port}`, pid: 1 }));
    try {
      const r = admin('status', '--data', data);
      expect(r.status, r.stderr).toBe(6);
      expect(r.stderr).toMatch(/^bkv-admin: VAULT_UNREACHABLE: a daemon announced itself .* but does not answer/);
      expect(existsSync(join(data, 'vault.lock'))).toBe(false);
    } finally {
      rmSync(join(data, 'admin.json'), { force: true });
      silent.close();
    }
  });

  it('health says unavailable (exit 6) when no daemon runs; backup-db explains the refusal', () => {
    expect(admin('health', '--data', data).status).toBe(6);
    const g = admin('backup-db');
    expect(g.status).toBe(0);
    expect(g.stdout).toContain('A restored copy of vault.db is refused, on purpose.');
    expect(g.stdout).toContain('STATE_ROLLBACK_DETECTED');
  });

  it('a daemon refuses to start on a data folder another process holds', async () => {
    const owner = await holdLock(data, 'bkv-admin');
    try {
      const r = spawnSync(process.execPath, [DAEMON, 'serve', '--data', data, '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], {
        encoding: 'utf8',
        env: env(),
        timeout: 20_000,
      });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/in use by bkv-admin/);
    } finally {
      owner.kill('SIGKILL');
      await new Promise((r) => owner.once('exit', r));
    }
  });
});

/** What `bkv-admin CMD --help` prints, from the command tree itself (80 columns, as on a pipe). */
function helpOf(path: readonly string[]): string {
  let cmd: Command = adminProgram;
  for (const name of path) {
    const sub = cmd.commands.find((c) => c.name() === name);
    if (!sub) throw new Error(`no command ${path.join(' ')}`);
    cmd = sub;
  }
  let out = '';
  cmd.configureOutput({ writeOut: (t) => (out += t), getOutHelpWidth: () => 80 });
  cmd.outputHelp();
  return out;
}

describe('bkv-admin --help', () => {
  const commands = [
    [],
    ['init'],
    ['status'],
    ['rotate'],
    ['tenant'],
    ['tenant', 'add'],
    ['tenant', 'list'],
    ['tenant', 'revoke'],
    ['tenant', 'token'],
    ['audit'],
    ['audit', 'verify'],
    ['audit', 'checkpoint'],
    ['backup-db'],
    ['config'],
    ['config', 'check'],
    ['health'],
    ['ceremony'],
    ['ceremony', 'target-init'],
    ['ceremony', 'trust'],
    ['ceremony', 'export'],
    ['ceremony', 'import'],
    ['ceremony', 'reanchor'],
    ['ceremony', 'seal'],
  ];
  // In-process: the command tree's own help, as --help prints it (one spawn per command
  // cost ~0.6 s each). The test after it checks that the program prints the same.
  it.each(commands.map((c) => [c.join(' ') || '(top)', c] as const))('%s', (_name, cmd) => {
    expect(helpOf(cmd)).toMatchSnapshot();
  });

  it('the program prints the same help as the command tree, and exits 0', () => {
    for (const cmd of [[], ['tenant', 'add'], ['ceremony', 'export']]) {
      const r = admin(...cmd, '--help');
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(helpOf(cmd));
    }
  });

  it('a usage error exits 2', () => {
    expect(admin('tenant', 'add').status).toBe(2);
    expect(admin('nonsense').status).toBe(2);
  });
});
