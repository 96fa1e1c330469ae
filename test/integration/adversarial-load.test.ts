// Mixed load on the real daemon: many connections running enrol / recover (right and
// wrong) / status / delete at once (the generator: test/helpers/load.ts). What must hold:
// no lost or doubled counter update (every acknowledged answer matches what the generator
// expects, and the final state equals its model), no connection left hanging afterwards,
// and no secret in the wire sample, the logs, the database or the audit log.
//
// A short run here (3 s, 20 connections; BKV_LOAD_SECONDS / BKV_LOAD_CONNECTIONS change it).
// Long runs and memory: test/soak/load-memory.test.ts (./scripts/soak); scripts/load runs
// 60 s with 200 connections; figures in docs/SECURITY.md.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { establishedOn, waitFor } from '../helpers/adversarial.js';
import { loadRun, startLoad, type LoadContext, type Stats } from '../helpers/load.js';

const SECONDS = Number(process.env.BKV_LOAD_SECONDS ?? 3);
const CONNECTIONS = Number(process.env.BKV_LOAD_CONNECTIONS ?? 20);

let ctx: LoadContext;

beforeAll(async () => {
  ctx = await startLoad();
});

afterAll(async () => {
  await ctx?.d.cleanup();
});

describe(`load: ${CONNECTIONS} connections for ${SECONDS} s`, () => {
  it('no lost or doubled counter update, no hanging connection', async () => {
    const s: Stats = { ops: {}, retryable: {}, violations: [], latencies: [] };
    const { elapsed, hotCounted } = await loadRun(ctx, SECONDS, CONNECTIONS, 'load', s);
    const closed = await waitFor(() => establishedOn(ctx.d.port) === 0, 10_000);
    const total = Object.values(s.ops).reduce((a, b) => a + b, 0);
    console.log(`load report ${JSON.stringify({ connections: CONNECTIONS, seconds: Math.round(elapsed * 10) / 10, operations: total, ops: s.ops, retryable: s.retryable, hotWrongGuessesCounted: hotCounted })}`);
    expect(s.violations.slice(0, 10)).toEqual([]);
    expect(total).toBeGreaterThan(CONNECTIONS);
    // The hot users' wrong guesses did race across connections, and each was counted once.
    expect(hotCounted).toBeGreaterThan(0);
    expect(closed).toBe(true);
    expect(ctx.d.proc.exitCode).toBeNull();
    // Errors in the daemon's own words: none.
    expect(ctx.d.logs.filter((l) => /"level":(50|60)|Unhandled|uncaught/i.test(l)).slice(0, 5)).toEqual([]);
  }, (SECONDS + 120) * 1000);

  it('leaks nothing into the sampled wire traffic, the logs, the database or the audit log', () => {
    const r = ctx.leaks.scan();
    console.log(`load leak scan: ${r.secrets} secrets x ${r.places} places (${r.bytes} bytes)`);
    expect(r.hits).toEqual([]);
  });
});
