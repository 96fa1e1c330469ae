// The admin listener's unauthenticated endpoints under a flood (docs/SECURITY.md F11).
// A flood of /readyz and /metrics raised the vault's RPC p50 from 6 ms to 138-215 ms,
// and every /readyz wrote to the database (the WAL grew 17 MB in 15 s). Readiness is
// now evaluated at most once a second whoever asks, and requests without the admin
// token are rate-limited (429 with Retry-After). Counted, not timed: database writes
// through the size of the write-ahead log, answers by status code.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';

let d: RunningDaemon;
let admin: string;

beforeAll(async () => {
  // SQLite's own checkpoints only (at 1 000 pages) and no checkpoint thread: until then every
  // commit appends to vault.db-wal, so its growth counts the pages written.
  d = await startDaemon({ env: { BKV_CHECKPOINT_WORKER: '0' } });
  admin = JSON.parse(readFileSync(join(d.dataDir, 'admin.json'), 'utf8')).url as string;
});
afterAll(async () => {
  await d?.cleanup();
});

const FRAME = 4096 + 24; // one WAL frame: a page and its header

describe('unauthenticated admin endpoints under a flood', () => {
  it('40 concurrent /readyz: all answered, at most one readiness write per second between them', async () => {
    const wal = join(d.dataDir, 'vault.db-wal');
    // One evaluation first, so the answers below are not the first ever.
    expect((await fetch(`${admin}/readyz`)).status).toBe(200);
    const before = statSync(wal).size;
    const t0 = performance.now();
    const answers = await Promise.all(Array.from({ length: 40 }, () => fetch(`${admin}/readyz`).then((r) => r.status)));
    const seconds = Math.ceil((performance.now() - t0) / 1000);
    expect(answers.every((s) => s === 200)).toBe(true);
    const frames = Math.ceil((statSync(wal).size - before) / FRAME);
    // Each evaluation's write probe is one small commit (a frame or two). Not a bound on time:
    // however long the 40 took, they may evaluate once per second of it, plus once.
    expect(frames).toBeLessThanOrEqual(2 * (seconds + 1));
  });

  it('past the limit: 429 with Retry-After, for /metrics, /readyz, /healthz and refused admin calls alike', async () => {
    const paths = ['/metrics', '/readyz', '/healthz', '/admin/status'];
    const results = await Promise.all(
      Array.from({ length: 240 }, (_, i) =>
        fetch(`${admin}${paths[i % paths.length]}`).then(async (r) => ({ path: paths[i % paths.length]!, status: r.status, retryAfter: r.headers.get('retry-after'), body: await r.text() })),
      ),
    );
    const limited = results.filter((r) => r.status === 429);
    // 240 requests against a burst of 50 refilled at 20/s: most are refused, whatever the pace.
    expect(limited.length).toBeGreaterThan(100);
    for (const p of paths) expect(limited.some((r) => r.path === p)).toBe(true);
    for (const r of limited) {
      expect(Number(r.retryAfter)).toBeGreaterThanOrEqual(1);
      expect(JSON.parse(r.body)).toMatchObject({ error: { code: 'RATE_LIMITED' } });
    }
    // Only refused admin calls that got past the limit were audited: the flood cannot fill the audit log.
    const denied = results.filter((r) => r.path === '/admin/status' && r.status === 401).length;
    const audited = readFileSync(join(d.dataDir, 'audit.log'), 'utf8').split('\n').filter((l) => l.includes('"event":"admin.denied"')).length;
    expect(audited).toBe(denied);
  });

  it('the admin token is not limited: bkv-admin works during a flood', async () => {
    const token = readFileSync(join(d.dataDir, 'admin-token'), 'utf8').trim();
    await Promise.all(Array.from({ length: 100 }, () => fetch(`${admin}/healthz`)));
    const r = await fetch(`${admin}/admin/status`, { headers: { authorization: `Bearer ${token}` } });
    expect(r.status).toBe(200);
  });
});
