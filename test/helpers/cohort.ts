// A real cohort for a test file: a 3-member etcd (helpers/etcd.ts) and 3 real
// daemons holding the same vault keys, each its own copy of one seed data folder
// (its own token copy and SQLite files), as the key ceremony would give.
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { readVaultKey } from '../../client/cli.js';
import { loadConfig, type Json } from '../../vault/config.js';
import { startDaemon, TEST_CONFIG, type RunningDaemon } from './daemon.js';
import { startEtcdCluster, type EtcdCluster } from './etcd.js';
import { TEST_KDF } from './vault.js';

export interface TestCohort {
  cluster: EtcdCluster;
  /** Replaced in place when a test restarts a node. */
  nodes: RunningDaemon[];
  seedDir: string;
  pinnedKey: Uint8Array;
  /** The config node i (0-based) runs with. */
  config(i: number): object;
  /** An SDK client on one node, no retries; as the node's dev tenant unless another tenant's token is given. */
  client(d: RunningDaemon, token?: string): VaultClient;
  stop(): Promise<void>;
}

export async function startTestCohort(opts: {
  prefix: string;
  /** Extra config for every node (merged over TEST_CONFIG). */
  nodeConfig?: object;
  /** Runs on the stopped seed's data folder before it is copied (e.g. the ceremony's target and trust). */
  prepareSeed?: (seedDir: string) => void;
}): Promise<TestCohort> {
  const cluster = await startEtcdCluster({ members: 3 });
  const dirs: string[] = [];
  const nodes: RunningDaemon[] = [];
  let seedDir = '';
  const stop = async () => {
    for (const n of nodes) await n?.stop('SIGKILL');
    for (const d of [...dirs, seedDir]) if (d) rmSync(d, { recursive: true, force: true });
    await cluster.stop();
  };
  try {
    // One key set: a single node makes the keys, the dev tenant and its token, then stops.
    const seed = await startDaemon();
    seedDir = seed.dataDir;
    const pinnedKey = readVaultKey(seed.vaultKeyFile);
    await seed.stop();
    opts.prepareSeed?.(seedDir);
    for (let i = 0; i < 3; i++) {
      const dir = mkdtempSync(join(tmpdir(), `bkv-${opts.prefix}-n${i + 1}-`));
      cpSync(seedDir, dir, { recursive: true });
      rmSync(join(dir, 'softhsm2.conf')); // names the seed's token folder; the node writes its own
      dirs.push(dir);
    }
    const config = (i: number) => ({ ...TEST_CONFIG, ...opts.nodeConfig, cohort: { endpoints: cluster.endpoints, prefix: opts.prefix, nodeId: `n${i + 1}` } });
    nodes.push(...(await Promise.all(dirs.map((dir, i) => startDaemon({ dataDir: dir, config: config(i) })))));
    return {
      cluster,
      nodes,
      seedDir,
      pinnedKey,
      config,
      client: (d, token = d.token) => new VaultClient({ transport: new WebSocketTransport({ url: d.url, token }), pinnedKey, kdf: TEST_KDF, maxRetries: 0 }),
      stop,
    };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** The message loadConfig refuses `overrides` with, or '' when it accepts them. */
export function configError(overrides: Json): string {
  try {
    loadConfig({ env: {}, overrides });
    return '';
  } catch (e) {
    return (e as Error).message;
  }
}
