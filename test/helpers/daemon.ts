// The real daemon as a child process on an ephemeral loopback port, with its
// own embedded SoftHSM2 token and SQLite file in a temp data folder.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { TEST_MODULE } from './softhsm.js';
import { makeNssToken } from './nss.js';

export const ROOT = resolve(import.meta.dirname, '../..');
export const DAEMON = join(ROOT, 'dist/vault/main.js');
export const CLI = join(ROOT, 'dist/client/cli.js');
export const ADMIN = join(ROOT, 'dist/vault/admin.js');

/** Small Argon2id floor so end-to-end tests spend their time on the vault. */
export const TEST_CONFIG = {
  vault: { kdfFloor: { m: 64, t: 1, p: 1 } },
  // Production's per-user limit (60/min) would throttle tests that replay a user's whole life in seconds.
  limits: { userPerMin: 600_000, userBurst: 10_000 },
  log: { level: 'info' },
};

export interface RunningDaemon {
  url: string;
  port: number;
  dataDir: string;
  /** Development tenant token (BKV_TOKEN). */
  token: string;
  /** PEM file with the pinned vault key (BKV_VAULT_KEY). */
  vaultKeyFile: string;
  proc: ChildProcess;
  /** Every stdout/stderr line so far (JSON log lines and the dev banner). */
  logs: string[];
  /** Environment for `bkv` child processes talking to this daemon. */
  cliEnv: NodeJS.ProcessEnv;
  /** Signal the daemon and wait for its exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  /** Stop (if running) and start again on the same data folder. */
  restart(): Promise<RunningDaemon>;
  /** Stop and delete the data folder. */
  cleanup(): Promise<void>;
}

/**
 * The host pid of a wrapper's child (`unshare -f` forks the daemon and waits for it). Signals
 * go to the daemon itself: unshare does not pass SIGTERM on.
 */
function childOf(pid: number): number | undefined {
  try {
    const first = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/)[0];
    return first ? Number(first) : undefined;
  } catch {
    return undefined;
  }
}

export async function startDaemon(
  opts: {
    dataDir?: string;
    config?: object;
    env?: NodeJS.ProcessEnv;
    port?: number;
    /** Run the daemon under this command, e.g. ['unshare', '-p', '-f', '--mount-proc'] (a PID namespace of its own). */
    wrap?: string[];
  } = {},
): Promise<RunningDaemon> {
  const dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'bkv-daemon-'));
  // BKV_TEST_MODULE=nss: the daemon runs on an NSS softoken token of its own (through
  // hsm.module, with no code change), unless the test configured an HSM itself. NSS lets
  // keys out wrapped, so the test pass accepts that explicitly (docs/OPERATIONS.md).
  let nssCleanup: (() => void) | undefined;
  if (TEST_MODULE === 'nss' && !(opts.config as { hsm?: unknown } | undefined)?.hsm) {
    const n = makeNssToken();
    nssCleanup = n.cleanup;
    const pinFile = join(dataDir, 'nss-pin');
    writeFileSync(pinFile, `${n.pin}\n`, { mode: 0o600 });
    const hsm = { module: n.modulePath, tokenLabel: n.label, pinFile, libraryParameters: n.standaloneParameters, acceptWrappableKeys: true };
    // A restart reuses the same token: the options carry it from here on.
    opts = { ...opts, dataDir, config: { ...(opts.config ?? TEST_CONFIG), hsm } };
  }
  const configFile = join(dataDir, 'test-config.json');
  writeFileSync(configFile, JSON.stringify(opts.config ?? TEST_CONFIG));
  const logs: string[] = [];
  const argv = [DAEMON, 'serve', '--config', configFile, '--data', dataDir, '--listen', `127.0.0.1:${opts.port ?? 0}`, '--init', '--dev'];
  const [cmd, ...args] = opts.wrap?.length ? [...opts.wrap, process.execPath, ...argv] : [process.execPath, ...argv];
  const proc = spawn(
    cmd!,
    args,
    // Admin listener on an ephemeral port: daemons of parallel test files must not fight over 8788.
    { env: { ...process.env, BKV_ADMIN_LISTEN: '127.0.0.1:0', ...opts.env, SOFTHSM2_CONF: undefined }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  const port = await new Promise<number>((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon did not start:\n${logs.join('\n')}`)), 30_000);
    const onLine = (line: string) => {
      logs.push(line);
      if (line.includes('"event":"listening"')) {
        clearTimeout(timer);
        resolvePort(JSON.parse(line).port as number);
      }
    };
    for (const stream of [proc.stdout!, proc.stderr!]) {
      let buf = '';
      stream.on('data', (d: Buffer) => {
        buf += d.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          onLine(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
    }
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited with ${code}:\n${logs.join('\n')}`));
    });
  });
  // The dev token is written right after "listening" (announced on stderr); a
  // restart finds the previous one, which stays valid, until the new one lands.
  let token = '';
  for (let i = 0; i < 600 && !token; i++) {
    if (logs.some((l) => l.includes('BKV_TOKEN='))) token = readFileSync(join(dataDir, 'dev-token'), 'utf8').trim();
    else await new Promise((r) => setTimeout(r, 50));
  }
  if (!token) throw new Error(`daemon wrote no dev token:\n${logs.join('\n')}`);
  const url = `ws://127.0.0.1:${port}`;
  const vaultKeyFile = join(dataDir, 'vault-key.pub');
  const d: RunningDaemon = {
    url,
    port,
    dataDir,
    token,
    vaultKeyFile,
    proc,
    logs,
    cliEnv: { ...process.env, BKV_VAULT: url, BKV_TOKEN: token, BKV_VAULT_KEY: vaultKeyFile },
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
      const inner = opts.wrap?.length ? childOf(proc.pid!) : undefined;
      if (inner) process.kill(inner, signal);
      else proc.kill(signal);
      return exited;
    },
    async restart() {
      await d.stop();
      return startDaemon({ ...opts, dataDir });
    },
    async cleanup() {
      await d.stop();
      rmSync(dataDir, { recursive: true, force: true });
      nssCleanup?.();
    },
  };
  return d;
}
