// Start-up: open the token, hold its keys to the policy, self-test them, open
// the database, and hand back a ready Vault. The only place that wires hsm/,
// hsm-policy/ and store/ together.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { Token, pinLibrary, type TokenConfig } from '../hsm/token.js';
import { quirksOf } from '../hsm/capabilities.js';
import { TokenVaultKeys, type VaultKeys } from '../hsm/vault-keys.js';
import { WorkerVaultKeys, type WorkerPoolOptions } from '../hsm/worker-keys.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { Store } from '../store/index.js';
import { Vault, type VaultOptions } from './vault.js';

export interface OpenOptions {
  hsm: TokenConfig;
  dbPath: string;
  /** Create missing keys (bkv-admin init). A serving vault never does. */
  createKeys?: boolean;
  vault?: Partial<VaultOptions>;
  log: Logger;
  /**
   * Run HSM calls in worker threads (WorkerVaultKeys) instead of on this thread
   * (TokenVaultKeys). Default false here (tools and tests); the daemon serves
   * with workers (openServingKeys). BKV_HSM_WORKERS overrides either way.
   */
  hsmWorkers?: boolean | WorkerPoolOptions;
  /** WAL checkpoints on a thread of their own (store/checkpointer.ts); the daemon always does. */
  checkpointWorker?: boolean;
}

/**
 * How the HSM is driven, from BKV_HSM_WORKERS (`0`/`off`: on the main thread;
 * `N`: N worker threads; `auto`/`on`: one per core), BKV_HSM_QUEUE (ECDH jobs
 * that may wait before OVERLOADED), BKV_HSM_RECYCLE (derives between
 * library recycles, 0 = never) and BKV_HSM_CONTROL (`0`: no thread of its own
 * for anchor writes), falling back to `fallback`.
 */
export function hsmWorkerSettings(fallback: boolean | WorkerPoolOptions, env: NodeJS.ProcessEnv = process.env): false | WorkerPoolOptions {
  const base: false | WorkerPoolOptions = fallback === true ? {} : fallback;
  const mode = env.BKV_HSM_WORKERS?.trim().toLowerCase();
  let out: false | WorkerPoolOptions = base;
  if (mode === '0' || mode === 'off' || mode === 'false') return false;
  if (mode === 'auto' || mode === 'on' || mode === 'true') out = { ...(base || {}) };
  else if (mode) {
    const n = Number(mode);
    if (!Number.isInteger(n) || n < 1 || n > 256) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, 'config: BKV_HSM_WORKERS must be off, auto or a thread count 1..256');
    }
    out = { ...(base || {}), threads: n };
  }
  if (!out) return false;
  const int = (name: string, min: number): number | undefined => {
    const v = env[name];
    if (v === undefined || v === '') return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new VaultError(ErrorCodes.BAD_REQUEST, `config: ${name} must be an integer >= ${min}`);
    return n;
  };
  const maxQueue = int('BKV_HSM_QUEUE', 1);
  const recycleAfter = int('BKV_HSM_RECYCLE', 0);
  const control = onOff(env, 'BKV_HSM_CONTROL');
  return {
    ...out,
    ...(maxQueue !== undefined ? { maxQueue } : {}),
    ...(recycleAfter !== undefined ? { recycleAfter } : {}),
    ...(control !== undefined ? { controlThread: control } : {}),
  };
}

/** The key set on worker threads, resolved (and with createKeys, made) under hsm-policy. */
export async function openWorkerKeys(hsm: TokenConfig, createKeys: boolean, log: Logger, pool: WorkerPoolOptions = {}): Promise<WorkerVaultKeys> {
  const keys = await WorkerVaultKeys.open(withQuirks(hsm), { ...pool, create: createKeys, log });
  if (keys.created.length) log.info({ event: 'hsm.keys.created', labels: keys.created }, 'created vault keys on the token');
  const st = keys.stats();
  log.info({ event: 'hsm.pool', threads: st.threads, controlThread: st.control }, 'HSM calls run on worker threads');
  return keys;
}

/**
 * The serving daemon's keys: HSM worker threads by default (the event loop
 * never waits for the HSM), or the main thread with BKV_HSM_WORKERS=off.
 */
export async function openServingKeys(hsm: TokenConfig, log: Logger, fallback: boolean | WorkerPoolOptions = true): Promise<VaultKeys> {
  const pool = hsmWorkerSettings(fallback);
  return pool ? openWorkerKeys(hsm, false, log, pool) : openKeys(hsm, false, log);
}

/**
 * `hsm` with the module's quirks (vault/hsm/capabilities.ts), measured once per
 * process and token when the caller has not already: the workers get them as data.
 */
export function withQuirks(hsm: TokenConfig): TokenConfig {
  if (hsm.quirks) return hsm;
  // Pinned so that closing the measuring token does not finalise the library the pool will use.
  const unpin = pinLibrary(hsm.modulePath, hsm.libraryParameters);
  try {
    const token = Token.open(hsm);
    try {
      return { ...hsm, quirks: quirksOf(token, hsm) };
    } finally {
      token.close();
    }
  } finally {
    unpin();
  }
}

export function openKeys(hsm: TokenConfig, createKeys: boolean, log: Logger): TokenVaultKeys {
  const token = Token.open(hsm);
  try {
    token.quirks = hsm.quirks ?? quirksOf(token, hsm);
    const keys = enforcePolicy(token, { create: createKeys });
    if (keys.created.length) log.info({ event: 'hsm.keys.created', labels: keys.created }, 'created vault keys on the token');
    // The resolver lets the keys recover from a lost login (stale handles) by themselves.
    return new TokenVaultKeys(token, keys, keys.created, () => enforcePolicy(token, { create: false }));
  } catch (e) {
    token.close();
    throw e;
  }
}

/** Round-trip every key once so a broken token fails at start, not on a user's recovery. */
export async function selfTest(keys: VaultKeys): Promise<void> {
  const probe = await keys.random(32);
  const mac = await keys.makeVerifier(probe);
  const epoch = keys.currentEpoch();
  const sealed = await keys.seal(epoch, probe, probe);
  const opened = await keys.unseal(epoch, probe, sealed);
  const ok =
    (await keys.checkVerifier(probe, mac)) &&
    !(await keys.checkVerifier(probe, new Uint8Array(32))) &&
    opened !== null &&
    Buffer.from(opened).equals(Buffer.from(probe)) &&
    (await keys.sign(probe)).length === 64 &&
    (await keys.oprfEvaluate(keys.channelPublic)).length === 32;
  if (!ok) throw new VaultError(ErrorCodes.HSM_ERROR, 'HSM self-test failed: a vault key does not round-trip');
}

/**
 * Whether the serving daemon runs SQLite's WAL checkpoints on a thread of their own
 * (store/checkpointer.ts): BKV_CHECKPOINT_WORKER `1` (default) or `0`.
 */
export function checkpointWorkerSetting(env: NodeJS.ProcessEnv = process.env): boolean {
  return onOff(env, 'BKV_CHECKPOINT_WORKER') ?? true;
}

/** A `0`/`1` switch from the environment; undefined when unset or empty. */
function onOff(env: NodeJS.ProcessEnv, name: string): boolean | undefined {
  const v = env[name]?.trim();
  if (v === undefined || v === '') return undefined;
  if (v === '1' || v === '0') return v === '1';
  throw new VaultError(ErrorCodes.BAD_REQUEST, `config: ${name} must be 0 or 1`);
}

export async function openVault(opts: OpenOptions): Promise<Vault> {
  const pool = hsmWorkerSettings(opts.hsmWorkers ?? false);
  const keys: VaultKeys = pool
    ? await openWorkerKeys(opts.hsm, opts.createKeys ?? false, opts.log, pool)
    : openKeys(opts.hsm, opts.createKeys ?? false, opts.log);
  let store: Store | undefined;
  try {
    await selfTest(keys);
    store = new Store(opts.dbPath, opts.checkpointWorker ? { checkpointWorker: {} } : {});
    return await Vault.open(keys, store, opts.log, opts.vault);
  } catch (e) {
    store?.close();
    keys.close();
    throw e;
  }
}
