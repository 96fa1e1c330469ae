// The cohort benchmark (issue 17; docs/COHORT.md "Figures"), side by side in
// one run on one machine: recoveries/s and latency of one node vs a 3-node
// cohort on a real 3-member etcd, then the stall a client sees across a kill -9
// of a vault node and of the etcd leader. Not part of the suite.
//
//   ./scripts/bench --cohort [--seconds 20] [--users 2000] [--concurrency 48]
//
// Servers are bench/server.ts (the daemon as `bkv-vault serve` assembles it,
// bench config: Argon2id floor m=64 KiB, no rate limits); load comes from
// bench/loadgen.ts processes speaking the wire protocol. Every node is a copy of
// the single node's data folder (same token, so the same vault keys; its own
// SQLite), as the key ceremony would give. Prints a table and one JSON line.
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { spawnJson, type JsonProc } from './lib/proc.js';
import { startEtcdCluster } from '../test/helpers/etcd.js';

const ROOT = resolve(import.meta.dirname, '..');
const DIST = join(ROOT, 'dist/bench');
const args = process.argv.slice(2);
const flag = (name: string, def: number) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] !== undefined ? Number(args[i + 1]) : def;
};
const SECONDS = flag('seconds', 20);
const USERS = flag('users', 2000);
const CONCURRENCY = flag('concurrency', 48);

interface Server {
  p: JsonProc;
  url: string;
  token: string;
  dir: string;
}
interface Result {
  rate: number;
  ops: number;
  errors: Record<string, number>;
  latencyMs: { p50: number; p99: number; max: number };
  failovers?: number;
}

async function server(dir: string, extra: string[] = []): Promise<Server> {
  const p = spawnJson(join(DIST, 'server.js'), ['--data', dir, ...extra]);
  const ready = await p.next((m) => m.event === 'ready', 300_000);
  return { p, url: `ws://127.0.0.1:${ready.port as number}`, token: ready.token as string, dir };
}
async function stop(s: Server): Promise<void> {
  await s.p.ask({ cmd: 'stop' }, 60_000).catch(() => undefined);
  await s.p.exited;
}
async function load(spec: Record<string, unknown>): Promise<Result> {
  const g = spawnJson(join(DIST, 'loadgen.js'), [JSON.stringify(spec)]);
  const m = await g.next<{ result: Result }>((x) => 'result' in x, 900_000);
  await g.exited;
  return m.result;
}
const closed = (url: string, token: string, op: string, from: number, to: number, load: object) => ({ target: 'vault', op, url, token, from, to, load, connections: 4 });

const work = mkdtempSync(join(tmpdir(), 'bkv-bench-cohort-'));
const rows: Record<string, unknown> = { seconds: SECONDS, users: USERS, concurrency: CONCURRENCY, loadavgBefore: loadavg()[0] };
try {
  // ---- one node ----
  const one = await server(join(work, 'single'), ['--init']);
  await load(closed(one.url, one.token, 'enroll', 0, USERS, { type: 'closed', concurrency: 16, count: USERS }));
  const single = await load({ ...closed(one.url, one.token, 'recover', 0, USERS, { type: 'closed', concurrency: CONCURRENCY, seconds: SECONDS }), warmupSec: 2 });
  await stop(one);
  rows.single = single;

  // ---- three nodes on etcd ----
  const cluster = await startEtcdCluster({ members: 3 });
  const endpoints = cluster.endpoints.join(',');
  const nodes: Server[] = [];
  try {
    for (const i of [1, 2, 3]) {
      const dir = join(work, `node${i}`);
      cpSync(one.dir, dir, { recursive: true });
      for (const f of ['softhsm2.conf', 'admin.json', 'admin-token', 'vault.lock']) rmSync(join(dir, f), { force: true });
      nodes.push(await server(dir, ['--cohort-endpoints', endpoints, '--node-id', `n${i}`]));
    }
    const [n1] = nodes as [Server, Server, Server];
    // Records live in etcd for a cohort: enrol the same users again, through node 1.
    await load(closed(n1.url, n1.token, 'enroll', USERS, 2 * USERS, { type: 'closed', concurrency: 16, count: USERS }));
    // One load generator per node, the users and the concurrency split between them.
    const per = Math.max(1, Math.round(CONCURRENCY / 3));
    const parts = await Promise.all(
      nodes.map((n) => load({ ...closed(n.url, n.token, 'recover', USERS, 2 * USERS, { type: 'closed', concurrency: per, seconds: SECONDS }), warmupSec: 2 })),
    );
    const rate = parts.reduce((a, r) => a + r.rate, 0);
    rows.cohort = { rate: Math.round(rate), perNode: parts.map((r) => ({ rate: r.rate, latencyMs: r.latencyMs, errors: r.errors })) };
    rows.ratio = Math.round((rate / single.rate) * 100) / 100;

    // ---- stall across kill -9: a node, then the etcd leader ----
    // The SDK over all three URLs, open loop; each flow's latency is timed from its scheduled start.
    const urls = nodes.map((n) => n.url).join(',');
    const keyFile = join(nodes[0]!.dir, 'vault-key.pub');
    const sdk = (op: string, from: number, to: number, l: object, timeline?: string) => ({ target: 'sdk', op, url: urls, token: n1.token, vaultKeyFile: keyFile, from, to, load: l, connections: 4, ...(timeline ? { timelineFile: timeline } : {}) });
    await load(sdk('enroll', 0, 200, { type: 'closed', concurrency: 8, count: 200 }));
    const stall = async (what: string, kill: () => Promise<void>) => {
      const timeline = join(work, `timeline-${what}.jsonl`);
      const run = load(sdk('recover', 0, 200, { type: 'open', rate: 20, seconds: 16 }, timeline));
      await new Promise((r) => setTimeout(r, 6000));
      const at = Date.now();
      await kill();
      const r = await run;
      const flows = readFileSync(timeline, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as [number, number]);
      // The stall: the longest a flow that arrived in the 5 s after the kill waited (it includes the failover).
      const after = flows.filter(([t]) => t >= at && t < at + 5000);
      return { stallMs: Math.round(Math.max(0, ...after.map(([, ms]) => ms))), flowsAfter: after.length, errors: r.errors, failovers: r.failovers, p50: r.latencyMs.p50 };
    };
    const victim = nodes[1]!;
    rows.killNode = await stall('node', async () => void victim.p.proc.kill('SIGKILL'));
    rows.killEtcdLeader = await stall('etcd-leader', async () => cluster.kill(await cluster.leader()));
  } finally {
    await Promise.all(nodes.map((n) => (n.p.proc.exitCode === null && n.p.proc.signalCode === null ? stop(n) : undefined)));
    await cluster.stop();
  }
  const s = rows.single as Result;
  const c = rows.cohort as { rate: number; perNode: { latencyMs: Result['latencyMs'] }[] };
  console.log(`one node:        ${s.rate} recoveries/s  p50 ${s.latencyMs.p50} ms  p99 ${s.latencyMs.p99} ms`);
  console.log(`3-node cohort:   ${c.rate} recoveries/s (${rows.ratio}× one node)  p50 ${c.perNode.map((p) => p.latencyMs.p50).join('/')} ms  p99 ${c.perNode.map((p) => p.latencyMs.p99).join('/')} ms (per node)`);
  console.log(`kill -9 node:    ${JSON.stringify(rows.killNode)}`);
  console.log(`kill -9 leader:  ${JSON.stringify(rows.killEtcdLeader)}`);
  rows.loadavgAfter = loadavg()[0];
  console.log(JSON.stringify({ result: rows }));
} finally {
  rmSync(work, { recursive: true, force: true });
}
