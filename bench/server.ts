// The vault daemon as the benchmark runs it: the same assembly as
// `bkv-vault serve` (data lock, metrics, audit log tap, startDaemon), minus the
// admin listener, plus a JSON-lines control channel on stdin/stdout (stats,
// stop) and `--no-anchor`, which turns the HSM anchor write into a no-op to
// measure what anchoring costs. A --no-anchor data folder is dead afterwards
// (its database runs ahead of its anchor): the benchmark only uses copies.
//
//   node dist/bench/server.js --data DIR [--no-anchor] [--init] [--cohort-endpoints URLS --node-id ID]
// Environment as for the daemon (BKV_HSM_WORKERS, BKV_HSM_RECYCLE, ...).
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks';
import type { Logger } from 'pino';
import { loadConfig } from '../vault/config.js';
import { devToken, startDaemon, type Daemon } from '../vault/daemon.js';
import { logTap, makeLogger, openAudit } from '../vault/logging.js';
import { initVault } from '../vault/setup.js';
import { Metrics } from '../vault/metrics.js';
import { acquireLock } from '../vault/admin/lock.js';
import type { VaultKeys } from '../vault/hsm/vault-keys.js';
import { decorateKeys } from '../vault/hsm/decorate.js';
import { poolOf } from '../vault/hsm/pool/pool.js';
import { emit, serveCommands } from './lib/proc.js';
import { BENCH_CONFIG } from './lib/config.js';
import { latency } from './lib/stats.js';


/** `k` with the anchor write a no-op (--no-anchor): what anchoring costs. */
const noAnchor = (k: VaultKeys): VaultKeys => decorateKeys(k, (op, call) => (op === 'writeAnchor' ? Promise.resolve(undefined) : call()));

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      data: { type: 'string' },
      'no-anchor': { type: 'boolean' },
      init: { type: 'boolean' },
      // A cohort node (bench/cohort.ts): etcd endpoints, comma-separated, and this node's id.
      'cohort-endpoints': { type: 'string' },
      'node-id': { type: 'string' },
    },
  });
  const dataDir = values.data!;
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const configFile = join(dataDir, 'bench-config.json');
  if (!existsSync(configFile)) writeFileSync(configFile, JSON.stringify(BENCH_CONFIG));
  const cohort = values['cohort-endpoints'] ? { cohort: { endpoints: values['cohort-endpoints'].split(','), nodeId: values['node-id'] ?? 'n1' } } : {};
  const c = loadConfig({ file: configFile, env: {}, overrides: { dataDir, listen: { host: '127.0.0.1', port: 0 }, ...cohort } });
  const lock = acquireLock(c.dataDir, 'bench server');
  const metrics = new Metrics();
  let log: Logger | undefined;
  const audit = openAudit(c, metrics, () => log);
  log = makeLogger(c, logTap(metrics, audit));
  if (values.init && !existsSync(join(c.dataDir, 'vault-key.pub'))) await initVault(c, log);
  const t0 = performance.now();
  let raw: VaultKeys | undefined;
  // Time each request spent in the daemon (frame in → answer sent), per method, between a stats
  // call with steps: 'start' and one with steps: 'stop': what the load generator's latency includes
  // besides its own work and the loopback. Off otherwise, so the memory phase measures the daemon only.
  let steps: Map<string, number[]> | undefined;
  const d: Daemon = await startDaemon(c, log, {
    metrics,
    audit,
    onRequest: (e) => {
      if (!steps) return;
      const a = steps.get(e.method) ?? steps.set(e.method, []).get(e.method)!;
      if (a.length < 100_000) a.push(e.ms);
    },
    wrapKeys: (k) => {
      raw = k;
      return values['no-anchor'] ? noAnchor(k) : k;
    },
  });
  const openMs = performance.now() - t0;
  // Since this process started: node start-up, module load, HSM workers, key policy, self-test, ledger, listening.
  const startupMs = performance.now();
  const token = await devToken(d, c, log);
  const records = d.vault.store.records.counts();
  emit({
    event: 'ready',
    port: d.server.port,
    token,
    vaultId: Buffer.from(d.vault.vaultId).toString('hex'),
    startupMs: Math.round(startupMs),
    openMs: Math.round(openMs),
    records: records.active + records.locked + records.deleted,
    hsmWorkers: poolOf(raw)?.stats().threads ?? 0,
  });
  let cpu0 = process.cpuUsage();
  // Where main-thread stalls come from: event-loop delay and GC pauses since the last reset.
  const eld = monitorEventLoopDelay({ resolution: 1 });
  eld.enable();
  let gcMs = 0;
  let gcMaxMs = 0;
  // Pauses worth lining up against a latency timeline: [start (epoch ms), duration ms].
  const pauses: [number, number][] = [];
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      gcMs += e.duration;
      gcMaxMs = Math.max(gcMaxMs, e.duration);
      if (e.duration >= 2 && pauses.length < 10_000) pauses.push([performance.timeOrigin + e.startTime, e.duration]);
    }
  }).observe({ entryTypes: ['gc'] });
  serveCommands(async (cmd) => {
    switch (cmd.cmd) {
      case 'stats': {
        if (cmd.gc && global.gc) global.gc();
        const cpu = process.cpuUsage(cmd.resetCpu ? undefined : cpu0);
        if (cmd.resetCpu) cpu0 = process.cpuUsage();
        const m = process.memoryUsage();
        const loop = {
          delayP50Ms: eld.percentile(50) / 1e6,
          delayP99Ms: eld.percentile(99) / 1e6,
          delayMaxMs: eld.max / 1e6,
          gcMs: Math.round(gcMs),
          gcMaxMs: Math.round(gcMaxMs * 10) / 10,
          ...(cmd.pauses ? { gcPauses: pauses.splice(0) } : {}),
        };
        const stepMs = cmd.steps === 'stop' && steps ? Object.fromEntries([...steps].map(([m, a]) => [m, latency(a)])) : undefined;
        if (cmd.steps === 'stop') steps = undefined;
        if (cmd.steps === 'start') steps = new Map();
        if (cmd.resetCpu) {
          eld.reset();
          gcMs = 0;
          gcMaxMs = 0;
        }
        return {
          loop,
          ...(stepMs ? { stepMs } : {}),
          rss: m.rss,
          heapUsed: m.heapUsed,
          external: m.external,
          cpuUserMs: cpu.user / 1000,
          cpuSystemMs: cpu.system / 1000,
          pool: poolOf(raw)?.stats(),
          ledger: d.vault.ledger.status(),
          checkpoints: d.vault.store.records.checkpoints(),
        };
      }
      case 'stop':
        await d.stop();
        lock.release();
        setImmediate(() => process.exit(0));
        return { stopped: true };
      default:
        throw new Error(`unknown command ${String(cmd.cmd)}`);
    }
  });
}

main().catch((e: unknown) => {
  emit({ error: (e as Error).message, fatal: true });
  process.exit(1);
});
