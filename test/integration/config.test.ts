// Configuration: one JSON or YAML file plus BKV_* environment overrides,
// validated with a message for every bad field at once — through loadConfig
// and through `bkv-admin config check` as an operator runs it.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ADMIN } from '../helpers/daemon.js';
import { loadConfig } from '../../vault/config.js';
import { hsmWorkerSettings } from '../../vault/core/open.js';
import { ErrorCodes } from '../../protocol/errors.js';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'bkv-config-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const file = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

/** Only the variables under test: the runner's own BKV_* must not leak in. */
const cleanEnv = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BKV_')) env[k] = v;
  return { ...env, ...extra };
};

function check(args: string[], env = cleanEnv()) {
  return spawnSync(process.execPath, [ADMIN, 'config', 'check', ...args], { encoding: 'utf8', env });
}

const message = (fn: () => unknown): string => {
  try {
    fn();
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error('expected an error');
};

describe('configuration validation', () => {
  it('names every bad field of a JSON file at once', () => {
    const f = file(
      'bad.json',
      JSON.stringify({
        listen: { host: '127.0.0.1', port: 70000 },
        vault: { attemptLimit: 0, kdfFloor: { m: 'big' } },
        admin: { port: -1 },
        audit: { checkpointEvery: 0 },
        log: { level: 'loud' },
        surprise: true,
      }),
    );
    const m = message(() => loadConfig({ file: f, env: cleanEnv() }));
    for (const field of ['listen.port', 'vault.attemptLimit', 'vault.kdfFloor.m', 'admin.port', 'audit.checkpointEvery', 'log.level', 'surprise']) {
      expect(m).toContain(field === 'surprise' ? '"surprise"' : `${field}:`);
    }
  });

  it('reads YAML, and reports YAML syntax errors with their position', () => {
    const ok = file('ok.yaml', 'dataDir: /tmp/x\nlisten:\n  host: 127.0.0.1\n  port: 9999\nadmin:\n  port: 0\nvault:\n  attemptLimit: 5\n');
    const c = loadConfig({ file: ok, env: cleanEnv() });
    expect(c.listen.port).toBe(9999);
    expect(c.admin).toEqual({ host: '127.0.0.1', port: 0 });
    expect(c.vault.attemptLimit).toBe(5);
    const broken = file('broken.yml', 'listen:\n  host: [unclosed\n');
    expect(message(() => loadConfig({ file: broken, env: cleanEnv() }))).toMatch(/not valid YAML.*line/s);
    const bad = file('bad.yaml', 'vault:\n  attemptLimit: ten\n  sessionTtlSec: 1\n');
    const m = message(() => loadConfig({ file: bad, env: cleanEnv() }));
    expect(m).toContain('vault.attemptLimit:');
    expect(m).toContain('vault.sessionTtlSec:');
  });

  it('environment overrides the file, and bad environment values are named too', () => {
    const f = file('env.json', JSON.stringify({ admin: { host: '127.0.0.1', port: 1234 } }));
    expect(loadConfig({ file: f, env: cleanEnv({ BKV_ADMIN_LISTEN: '127.0.0.1:4321' }) }).admin.port).toBe(4321);
    expect(loadConfig({ env: cleanEnv({ BKV_AUDIT_FILE: '/var/log/bkv-audit.log' }) }).audit.file).toBe('/var/log/bkv-audit.log');
    expect(message(() => loadConfig({ env: cleanEnv({ BKV_ATTEMPT_LIMIT: 'many' }) }))).toContain('BKV_ATTEMPT_LIMIT');
    expect(message(() => loadConfig({ env: cleanEnv({ BKV_ADMIN_LISTEN: 'nowhere' }) }))).toContain('HOST:PORT');
  });

  it('session and channel quotas have defaults and must leave room for recoveries (issue 14)', () => {
    const c = loadConfig({ env: cleanEnv() });
    expect(c.limits).toMatchObject({ maxSessions: 100_000, tenantSessions: 20_000, tenantEnrollments: 5_000, maxChannels: 100_000, tenantChannels: 20_000 });
    const f = file('quotas.json', JSON.stringify({ limits: { maxSessions: 1000, tenantSessions: 2000, tenantEnrollments: 2000, tenantChannels: 200_000 } }));
    const m = message(() => loadConfig({ file: f, env: cleanEnv() }));
    expect(m).toContain('limits.tenantSessions: must be at most limits.maxSessions');
    expect(m).toContain('limits.tenantEnrollments: must be below limits.tenantSessions');
    expect(m).toContain('limits.tenantEnrollments: must be at most half of limits.maxSessions');
    expect(m).toContain('limits.tenantChannels: must be at most limits.maxChannels');
  });

  it('`bkv-admin config check` prints every bad field and exits 2', () => {
    const f = file('check-bad.json', JSON.stringify({ listen: { port: 'x' }, limits: { maxInFlight: 0 }, hsm: { tokenLabel: '' } }));
    const r = check(['--config', f]);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('listen.port:');
    expect(r.stderr).toContain('limits.maxInFlight:');
    expect(r.stderr).toContain('hsm.tokenLabel:');
  });

  it('`bkv-admin config check` also catches what only shows at start: missing files, plain ws:// off loopback', () => {
    const f = file(
      'check-files.json',
      JSON.stringify({ dataDir: dir, listen: { host: '0.0.0.0', port: 8787 }, hsm: { module: '/nonexistent/libhsm.so', tokenLabel: 'prod' } }),
    );
    const r = check(['--config', f]);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('listen.host: 0.0.0.0 is not loopback');
    expect(r.stderr).toContain('hsm.module: PKCS#11 module /nonexistent/libhsm.so does not exist');
    expect(r.stderr).toContain('hsm.pinFile: an external hsm.module needs hsm.pinFile (or BKV_HSM_PIN');
  });

  it('`bkv-admin config check` accepts a good file with environment overrides, and the PIN never appears', () => {
    // A data folder of its own: this one holds the test's config files, readable by others, which config check would rightly warn about.
    const f = file('good.yaml', `dataDir: ${join(dir, 'data')}\nadmin:\n  port: 18788\n`);
    const r = check(['--config', f], cleanEnv({ BKV_LISTEN: '127.0.0.1:18787', BKV_HSM_PIN: 'pin-must-not-show' }));
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('configuration OK');
    expect(r.stdout).toContain('ws://127.0.0.1:18787');
    expect(r.stdout).toContain('http://127.0.0.1:18788');
    expect(r.stdout).toContain('PIN from BKV_HSM_PIN');
    expect(r.stdout + r.stderr).not.toContain('pin-must-not-show');
  });
});

describe('HSM pool and checkpoint settings: config fields, BKV_* overrides', () => {
  const cfg = (env: Record<string, string>, file?: object) => {
    if (!file) return loadConfig({ env });
    const dir = mkdtempSync(join(tmpdir(), 'bkv-knobs-'));
    try {
      writeFileSync(join(dir, 'config.json'), JSON.stringify(file));
      return loadConfig({ env, file: join(dir, 'config.json') });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  it('reads the thread count, queue, recycle interval and control thread from the environment, and refuses nonsense', () => {
    expect(hsmWorkerSettings(cfg({}).hsm)).toEqual({ controlThread: true });
    expect(hsmWorkerSettings(cfg({ BKV_HSM_WORKERS: 'off' }).hsm)).toBe(false);
    expect(hsmWorkerSettings(cfg({ BKV_HSM_WORKERS: '0' }).hsm)).toBe(false);
    expect(hsmWorkerSettings(cfg({ BKV_HSM_WORKERS: '3', BKV_HSM_QUEUE: '64', BKV_HSM_RECYCLE: '0', BKV_HSM_CONTROL: '0' }).hsm)).toEqual({
      threads: 3,
      maxQueue: 64,
      recycleAfter: 0,
      controlThread: false,
    });
    for (const env of [{ BKV_HSM_CONTROL: '2' }, { BKV_HSM_CONTROL: 'yes' }, { BKV_HSM_WORKERS: '0.5' }, { BKV_HSM_WORKERS: '300' }, { BKV_HSM_QUEUE: '0' }] as Record<string, string>[]) {
      expect(() => cfg(env)).toThrow(expect.objectContaining({ code: ErrorCodes.BAD_REQUEST }));
    }
    expect(() => cfg({ BKV_HSM_CONTROL: '2' })).toThrow('config: BKV_HSM_CONTROL must be 1 or 0');
    expect(() => cfg({ BKV_HSM_WORKERS: '300' })).toThrow(/hsm\.workers/);
  });

  it('the same knobs from the config file, the environment winning', () => {
    const file = { hsm: { tokenLabel: 'bkv-embedded', workers: 2, queue: 32, recycleAfter: 1000, controlThread: false }, store: { checkpointWorker: false } };
    const c = cfg({}, file);
    expect(hsmWorkerSettings(c.hsm)).toEqual({ threads: 2, maxQueue: 32, recycleAfter: 1000, controlThread: false });
    expect(c.store.checkpointWorker).toBe(false);
    expect(hsmWorkerSettings(cfg({ BKV_HSM_WORKERS: 'off' }, file).hsm)).toBe(false);
    expect(cfg({ BKV_CHECKPOINT_WORKER: '1' }, file).store.checkpointWorker).toBe(true);
  });

  it('BKV_CHECKPOINT_WORKER turns the WAL checkpoint thread off or on, and nothing else', () => {
    expect(cfg({}).store.checkpointWorker).toBe(true);
    expect(cfg({ BKV_CHECKPOINT_WORKER: '1' }).store.checkpointWorker).toBe(true);
    expect(cfg({ BKV_CHECKPOINT_WORKER: '0' }).store.checkpointWorker).toBe(false);
    for (const v of ['off', '2', 'yes']) {
      expect(() => cfg({ BKV_CHECKPOINT_WORKER: v })).toThrow(expect.objectContaining({ code: ErrorCodes.BAD_REQUEST }));
    }
    expect(() => cfg({ BKV_CHECKPOINT_WORKER: 'off' })).toThrow('config: BKV_CHECKPOINT_WORKER must be 1 or 0');
  });
});
