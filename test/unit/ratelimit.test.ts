// The rate limiter under a key explosion (issue 14, finding 4). Before the fix,
// above 100 000 distinct keys vault/rpc/ratelimit.ts scanned its whole map on
// every request: throughput fell 7x and another tenant's p50 went from 6 ms to
// 951 ms. Checked structurally, not by the clock (the machine is shared): the
// map entries one request visits, the buckets held, and whose buckets survive.
// The timing figure is an opt-in run (scripts/flood, docs/SECURITY.md).
import { describe, it, expect } from 'vitest';
import { RateLimiter } from '../../vault/rpc/ratelimit.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';

// Production defaults (vault/config.ts), per-tenant user buckets included.
const RATES = { tenant: { perSec: 2000, burst: 4000 }, user: { perSec: 60 / 60, burst: 20 } };
const USER_BUCKETS = 50_000;

/** Map entries visited (by any iteration) while `fn` runs; throws once one call visits more than `perCall`. */
function visitsDuring<T>(fn: (mark: () => void) => T, perCall: number): { result: T; visits: number } {
  const proto = Map.prototype as unknown as Record<string | symbol, (...a: unknown[]) => unknown>;
  const names: (string | symbol)[] = [Symbol.iterator, 'entries', 'keys', 'values'];
  const saved = new Map(names.map((n) => [n, proto[n]!]));
  const savedForEach = proto.forEach!;
  let visits = 0;
  let sinceMark = 0;
  const visit = () => {
    visits++;
    if (++sinceMark > perCall) throw new Error(`one request visited more than ${perCall} map entries: work per request is not bounded`);
  };
  for (const n of names) {
    const orig = saved.get(n)!;
    proto[n] = function (this: Map<unknown, unknown>) {
      const it = orig.call(this) as Iterator<unknown>;
      const wrapped = {
        next() {
          const r = it.next();
          if (!r.done) visit();
          return r;
        },
        [Symbol.iterator]() {
          return wrapped;
        },
      };
      return wrapped;
    };
  }
  proto.forEach = function (this: Map<unknown, unknown>, cb: unknown, thisArg: unknown) {
    return savedForEach.call(this, (v: unknown, k: unknown, m: unknown) => {
      visit();
      (cb as (v: unknown, k: unknown, m: unknown) => void).call(thisArg, v, k, m);
    });
  };
  try {
    return { result: fn(() => (sinceMark = 0)), visits };
  } finally {
    for (const n of names) proto[n] = saved.get(n)!;
    proto.forEach = savedForEach;
  }
}

const code = (f: () => void): string => {
  try {
    f();
    return 'ok';
  } catch (e) {
    if (e instanceof VaultError) return e.code;
    throw e;
  }
};

describe('rate limiter under 200 000 distinct keys (issue 14, finding 4)', () => {
  it('visits a bounded number of map entries per request and holds a bounded number of buckets', () => {
    const clock = { now: 1_000_000 };
    // The exploding tenant is not throttled as a whole here, so every request reaches its user bucket.
    const limiter = new RateLimiter({ tenant: { perSec: 1e9, burst: 1e9 }, user: RATES.user }, () => clock.now, { userBucketsPerTenant: USER_BUCKETS });
    const N = 200_000;
    const { visits } = visitsDuring((mark) => {
      for (let i = 0; i < N; i++) {
        mark();
        // 1 ms apart: the tenant's whole rate, as the attack run sent it.
        clock.now += 1;
        limiter.take('flood', `user-${i}`);
      }
    }, 8);
    expect(visits).toBeLessThanOrEqual(4 * N);
    // Bounded: the tenant's user buckets, plus one bucket per tenant.
    expect(limiter.size()).toBeLessThanOrEqual(USER_BUCKETS + 1);
  });

  it("one tenant's key explosion neither evicts nor starves another tenant's buckets", () => {
    const clock = { now: 1_000_000 };
    const limiter = new RateLimiter({ tenant: { perSec: 1e9, burst: 1e9 }, user: RATES.user }, () => clock.now, { userBucketsPerTenant: 1_000 });
    // Tenant B's user spends its burst: limited, with a retry hint.
    for (let i = 0; i < RATES.user.burst; i++) limiter.take('b', 'b-user');
    expect(code(() => limiter.take('b', 'b-user'))).toBe(ErrorCodes.RATE_LIMITED);
    // Tenant A goes through 200 times its partition's size in distinct user ids, at once.
    let refusedA = 0;
    visitsDuring((mark) => {
      for (let i = 0; i < 200_000; i++) {
        mark();
        if (code(() => limiter.take('a', `a-${i}`)) !== 'ok') refusedA++;
      }
    }, 8);
    // B's spent bucket was neither evicted (a fresh bucket would let it through) nor touched.
    expect(code(() => limiter.take('b', 'b-user'))).toBe(ErrorCodes.RATE_LIMITED);
    // B's other users are served at once; A's partition stayed within its bound.
    for (let i = 0; i < 50; i++) expect(code(() => limiter.take('b', `b-${i}`))).toBe('ok');
    expect(limiter.size()).toBeLessThanOrEqual(1_000 + 1 + 51 + 1);
    // A's buckets are not handed out fresh early either: within one instant, past its
    // partition, new users of A wait (RATE_LIMITED) until the oldest bucket has refilled.
    expect(refusedA).toBe(200_000 - 1_000);
    clock.now += (RATES.user.burst / RATES.user.perSec) * 1000 + 1;
    expect(code(() => limiter.take('a', 'a-late'))).toBe('ok');
    expect(code(() => limiter.take('b', 'b-user'))).toBe('ok');
  });

  it('with the default rates a tenant cannot fill its partition with buckets that are still refilling', () => {
    // The partition holds only buckets still refilling. At 2000 requests/s (burst 4000) a
    // tenant touches at most 4000 + 2000 × 20 = 44 000 distinct users within the 20 s an
    // emptied user bucket needs to refill (1 s for one touched once, as here): under the
    // 50 000 bound, so a user is only ever refused by its own bucket.
    const clock = { now: 1_000_000 };
    const limiter = new RateLimiter(RATES, () => clock.now, { userBucketsPerTenant: USER_BUCKETS });
    const seen: Record<string, number> = {};
    visitsDuring((mark) => {
      for (let i = 0; i < 200_000; i++) {
        mark();
        clock.now += 0.5;
        const c = code(() => limiter.take('t', `u-${i}`));
        seen[c] = (seen[c] ?? 0) + 1;
      }
    }, 8);
    expect(seen).toEqual({ ok: 200_000 });
  });
});
