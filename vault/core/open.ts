// Start-up: open the token, hold its keys to the policy, self-test them, open
// the database, and hand back a ready Vault. The only place that wires hsm/,
// hsm-policy/ and store/ together.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { Token, pinLibrary, type TokenConfig } from '../hsm/token.js';
import { quirksOf } from '../hsm/capabilities.js';
import type { VaultKeys } from '../hsm/vault-keys.js';
import { tokenKeys, type TokenPort } from '../hsm/token-port.js';
import type { HsmKeys } from '../hsm/keys.js';
import { poolKeys, type HsmPool, type WorkerPoolOptions } from '../hsm/pool/pool.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { Store } from '../store/index.js';
import { Vault, type VaultOptions } from './vault.js';
import type { Config } from '../config.js';

export interface OpenOptions {
  hsm: TokenConfig;
  dbPath: string;
  /** Create missing keys (bkv-admin init). A serving vault never does. */
  createKeys?: boolean;
  vault?: Partial<VaultOptions>;
  log: Logger;
  /**
   * Run HSM calls in worker threads (the HsmPool port) instead of on this thread
   * (TokenPort). Default false here (tools and tests); the daemon serves
   * with workers (openServingKeys, as the config's hsm.workers says).
   */
  hsmWorkers?: boolean | WorkerPoolOptions;
  /** WAL checkpoints on a thread of their own (store/checkpointer.ts); the daemon always does. */
  checkpointWorker?: boolean;
}

/**
 * The worker pool the daemon's config asks for (hsm.workers, hsm.queue, hsm.recycleAfter,
 * hsm.controlThread; BKV_HSM_* override them like every field), or false for the main thread.
 */
export function hsmWorkerSettings(h: Pick<Config['hsm'], 'workers' | 'queue' | 'recycleAfter' | 'controlThread'>): false | WorkerPoolOptions {
  if (h.workers === 'off') return false;
  return {
    ...(typeof h.workers === 'number' ? { threads: h.workers } : {}),
    ...(h.queue !== undefined ? { maxQueue: h.queue } : {}),
    ...(h.recycleAfter !== undefined ? { recycleAfter: h.recycleAfter } : {}),
    controlThread: h.controlThread,
  };
}

/** The key set on worker threads, resolved (and with createKeys, made) under hsm-policy. */
export async function openWorkerKeys(hsm: TokenConfig, createKeys: boolean, log: Logger, pool: WorkerPoolOptions = {}): Promise<HsmKeys<HsmPool>> {
  const keys = await poolKeys(withQuirks(hsm), { ...pool, create: createKeys, log });
  if (keys.created.length) log.info({ event: 'hsm.keys.created', labels: keys.created }, 'created vault keys on the token');
  const st = keys.port.stats();
  log.info({ event: 'hsm.pool', threads: st.threads, controlThread: st.control }, 'HSM calls run on worker threads');
  return keys;
}

/** The serving daemon's keys: on HSM worker threads (the event loop never waits for the HSM) unless `pool` is false. */
export async function openServingKeys(hsm: TokenConfig, log: Logger, pool: false | WorkerPoolOptions): Promise<VaultKeys> {
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

export function openKeys(hsm: TokenConfig, createKeys: boolean, log: Logger): HsmKeys<TokenPort> {
  const token = Token.open(hsm);
  try {
    token.quirks = hsm.quirks ?? quirksOf(token, hsm);
    const keys = enforcePolicy(token, { create: createKeys });
    if (keys.created.length) log.info({ event: 'hsm.keys.created', labels: keys.created }, 'created vault keys on the token');
    // The resolver lets the keys recover from a lost login (stale handles) by themselves.
    return tokenKeys(token, keys, keys.created, () => enforcePolicy(token, { create: false }));
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

export async function openVault(opts: OpenOptions): Promise<Vault> {
  const pool: false | WorkerPoolOptions = opts.hsmWorkers === true ? {} : (opts.hsmWorkers ?? false);
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
    await keys.close();
    throw e;
  }
}
