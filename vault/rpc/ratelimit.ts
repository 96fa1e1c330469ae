// Token buckets per tenant and per (tenant, user). Buckets that refilled
// completely are dropped, so memory tracks active callers, not all callers.
import { VaultError, ErrorCodes } from '../errors.js';

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

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();

  constructor(
    private readonly rates: { tenant: Rate; user: Rate },
    private readonly now: () => number = Date.now,
  ) {}

  /** Buckets held (metrics). */
  size(): number {
    return this.buckets.size;
  }

  /** Take one token from each bucket, or refuse with RATE_LIMITED (taking none). */
  take(tenant: string, userId?: string): void {
    const t = this.now();
    const keys: [string, Rate][] = [[`t:${tenant}`, this.rates.tenant]];
    if (userId !== undefined) keys.push([`u:${tenant}:${userId}`, this.rates.user]);
    const states = keys.map(([k, rate]) => [k, rate, this.refill(k, rate, t)] as const);
    for (const [, rate, b] of states) {
      if (b.tokens < 1) {
        const retryAfterMs = Math.ceil(((1 - b.tokens) / rate.perSec) * 1000);
        throw new VaultError(ErrorCodes.RATE_LIMITED, 'rate limit exceeded; retry later', { retryAfterMs });
      }
    }
    for (const [k, , b] of states) {
      b.tokens -= 1;
      this.buckets.set(k, b);
    }
    if (this.buckets.size > 100_000) this.prune(t);
  }

  private refill(key: string, rate: Rate, t: number): Bucket {
    const b = this.buckets.get(key) ?? { tokens: rate.burst, at: t };
    return { tokens: Math.min(rate.burst, b.tokens + ((t - b.at) / 1000) * rate.perSec), at: t };
  }

  private prune(t: number): void {
    for (const [k, b] of this.buckets) if (t - b.at > 600_000) this.buckets.delete(k);
  }
}
