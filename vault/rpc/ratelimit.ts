// Token buckets per tenant and per (tenant, user), partitioned by tenant so one
// tenant's key explosion can neither slow down nor evict another's buckets
// (issue 14, finding 4: the old single map was scanned whole on every request
// above 100 000 keys).
//
// Each tenant's user buckets are a Map kept in least-recently-used order
// (a touch moves the key to the end), bounded by `userBucketsPerTenant`. Work
// per request is O(1): two lookups, one re-insertion, and a look at the oldest
// bucket or two. A bucket is dropped only once it has refilled completely — so
// dropping it gives nothing away — and a tenant whose partition is full of
// buckets still refilling is refused (RATE_LIMITED) for new users until the
// oldest has refilled: never a fresh bucket early. lru-cache would evict its
// oldest entry unconditionally, which is exactly that bypass; the conditional
// rule is a few lines on a Map.
//
// Memory: tenants (bounded by the tenants table) × (1 + userBucketsPerTenant)
// buckets of ~100 B plus the user id.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

export interface Rate {
  /** Tokens added per second. */
  perSec: number;
  /** Bucket size. */
  burst: number;
}

interface Bucket {
  tokens: number;
  at: number;
}

interface Partition {
  tenant: Bucket;
  /** User buckets, least recently used first. */
  users: Map<string, Bucket>;
}

export interface RateLimiterOptions {
  /** User buckets per tenant. Default 50 000. */
  userBucketsPerTenant?: number;
}

export class RateLimiter {
  private readonly partitions = new Map<string, Partition>();
  private readonly maxUsers: number;
  private buckets = 0;

  constructor(
    private readonly rates: { tenant: Rate; user: Rate },
    private readonly now: () => number = Date.now,
    opts: RateLimiterOptions = {},
  ) {
    this.maxUsers = opts.userBucketsPerTenant ?? 50_000;
  }

  /** Buckets held, tenants' and users' (metrics, tests). */
  size(): number {
    return this.buckets;
  }

  /** Take one token from each bucket, or refuse with RATE_LIMITED (taking none). */
  take(tenant: string, userId?: string): void {
    const t = this.now();
    let p = this.partitions.get(tenant);
    if (!p) {
      this.partitions.set(tenant, (p = { tenant: { tokens: this.rates.tenant.burst, at: t }, users: new Map() }));
      this.buckets++;
    }
    const tb = refill(p.tenant, this.rates.tenant, t);
    if (tb.tokens < 1) throw limited(tb, this.rates.tenant);
    if (userId === undefined) {
      p.tenant = { tokens: tb.tokens - 1, at: t };
      return;
    }
    const users = p.users;
    const known = users.get(userId);
    if (!known) this.makeRoom(users, t);
    const ub = refill(known ?? { tokens: this.rates.user.burst, at: t }, this.rates.user, t);
    if (ub.tokens < 1) throw limited(ub, this.rates.user);
    p.tenant = { tokens: tb.tokens - 1, at: t };
    // Re-inserted at the end: the map stays in least-recently-used order.
    if (known) users.delete(userId);
    else this.buckets++;
    users.set(userId, { tokens: ub.tokens - 1, at: t });
  }

  /**
   * Room for one more user bucket: drop the oldest if it has refilled completely (a
   * full bucket is what a new one would be), and one more while at it, so the map
   * tracks active callers; refuse if the oldest is still refilling and there is no room.
   */
  private makeRoom(users: Map<string, Bucket>, t: number): void {
    for (let i = 0; i < 2; i++) {
      const oldest = users.entries().next().value;
      if (!oldest) return;
      const b = refill(oldest[1], this.rates.user, t);
      if (b.tokens < this.rates.user.burst) {
        if (users.size < this.maxUsers) return;
        const waitMs = Math.ceil(((this.rates.user.burst - b.tokens) / this.rates.user.perSec) * 1000);
        throw new VaultError(ErrorCodes.RATE_LIMITED, 'too many distinct users for this tenant right now; retry later', { retryAfterMs: Math.max(1, waitMs) });
      }
      users.delete(oldest[0]);
      this.buckets--;
    }
  }
}

function refill(b: Bucket, rate: Rate, t: number): Bucket {
  return { tokens: Math.min(rate.burst, b.tokens + (Math.max(0, t - b.at) / 1000) * rate.perSec), at: t };
}

function limited(b: Bucket, rate: Rate): VaultError {
  const retryAfterMs = Math.ceil(((1 - b.tokens) / rate.perSec) * 1000);
  return new VaultError(ErrorCodes.RATE_LIMITED, 'rate limit exceeded; retry later', { retryAfterMs });
}
