// The mixed load of test/integration/adversarial-load.test.ts, long and twice, with the
// daemon's memory: back near its baseline after a run, and no growth from one run to the
// next. RSS on a shared machine moves with other work, so only ./scripts/soak runs this.
// BKV_LOAD_SECONDS (default 10) with BKV_LOAD_CONNECTIONS (default 50).
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { establishedOn, rssOf, waitFor, quantile } from '../helpers/adversarial.js';
import { cpuSecondsOf, loadRun, startLoad, type LoadContext, type Stats } from '../helpers/load.js';

const SECONDS = Number(process.env.BKV_LOAD_SECONDS ?? 10);
const CONNECTIONS = Number(process.env.BKV_LOAD_CONNECTIONS ?? 50);

let ctx: LoadContext;

beforeAll(async () => {
  ctx = await startLoad();
});

afterAll(async () => {
  await ctx?.d.cleanup();
});

describe(`load: ${CONNECTIONS} connections for ${SECONDS} s`, () => {
  it('no lost or doubled counter update, no hanging connection, memory back near baseline', async () => {
    // Warm-up (JIT, pools, SQLite cache), then the baseline with everything idle.
    await loadRun(ctx, Math.min(3, SECONDS), Math.min(20, CONNECTIONS), 'warm', { ops: {}, retryable: {}, violations: [], latencies: [] });
    await waitFor(() => establishedOn(ctx.d.port) === 0, 10_000);
    await new Promise((r) => setTimeout(r, 1500));
    const baseline = rssOf(ctx.d.proc.pid!);

    const s: Stats = { ops: {}, retryable: {}, violations: [], latencies: [] };
    const cpu0 = { daemon: cpuSecondsOf(ctx.d.proc.pid!), generator: process.cpuUsage() };
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, rssOf(ctx.d.proc.pid!))), 250);
    const { elapsed, hotCounted } = await loadRun(ctx, SECONDS, CONNECTIONS, 'load', s);
    clearInterval(sampler);
    const gen = process.cpuUsage(cpu0.generator);
    const cpu = { daemon: Math.round((cpuSecondsOf(ctx.d.proc.pid!) - cpu0.daemon) / elapsed * 100), generator: Math.round((gen.user + gen.system) / 1e6 / elapsed * 100) };
    const closed = await waitFor(() => establishedOn(ctx.d.port) === 0, 10_000);
    await new Promise((r) => setTimeout(r, 3000));
    const after = rssOf(ctx.d.proc.pid!);
    const total = Object.values(s.ops).reduce((a, b) => a + b, 0);
    const report = {
      connections: CONNECTIONS,
      seconds: Math.round(elapsed * 10) / 10,
      operations: total,
      perSecond: Math.round(total / elapsed),
      ops: s.ops,
      retryable: s.retryable,
      hotWrongGuessesCounted: hotCounted,
      latencyMs: { p50: Math.round(quantile(s.latencies, 0.5)), p99: Math.round(quantile(s.latencies, 0.99)), max: Math.round(Math.max(...s.latencies)) },
      rssMB: { baseline: Math.round(baseline / 2 ** 20), peak: Math.round(peak / 2 ** 20), after: Math.round(after / 2 ** 20) },
      cpuPercent: cpu,
      leftOpen: establishedOn(ctx.d.port),
    };
    // The same load again: a leak grows with every run, allocator and heap slack does not.
    expect(s.violations.slice(0, 10)).toEqual([]);
    expect(total).toBeGreaterThan(CONNECTIONS);
    expect(closed).toBe(true);
    expect(ctx.d.proc.exitCode).toBeNull();
    {
      const s2: Stats = { ops: {}, retryable: {}, violations: [], latencies: [] };
      await loadRun(ctx, SECONDS, CONNECTIONS, 'again', s2);
      const closedAgain = await waitFor(() => establishedOn(ctx.d.port) === 0, 10_000);
      await new Promise((r) => setTimeout(r, 3000));
      const afterAgain = rssOf(ctx.d.proc.pid!);
      Object.assign(report, {
        again: { operations: Object.values(s2.ops).reduce((a, b) => a + b, 0), rssMBAfter: Math.round(afterAgain / 2 ** 20), leftOpen: establishedOn(ctx.d.port) },
      });
      expect(s2.violations.slice(0, 10)).toEqual([]);
      expect(closedAgain).toBe(true);
      // Back near the baseline: within a quarter of it plus 48 MiB for allocator slack (V8 keeps some heap)...
      expect(after).toBeLessThan(baseline * 1.25 + 48 * 2 ** 20);
      // ...and no growth from one run to the next beyond 16 MiB.
      expect(afterAgain).toBeLessThan(after + 16 * 2 ** 20);
    }
    console.log(`load report ${JSON.stringify(report)}`);
    // Errors in the daemon's own words: none.
    expect(ctx.d.logs.filter((l) => /"level":(50|60)|Unhandled|uncaught/i.test(l)).slice(0, 5)).toEqual([]);
  }, (2 * SECONDS + 150) * 1000);

  it('leaks nothing into the sampled wire traffic, the logs, the database or the audit log', () => {
    const r = ctx.leaks.scan();
    console.log(`load leak scan: ${r.secrets} secrets x ${r.places} places (${r.bytes} bytes)`);
    expect(r.hits).toEqual([]);
  });
});
