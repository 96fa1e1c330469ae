// Backend authentication: HS256 JWTs whose key is the tenant's secret. The
// secret is HMAC_hsm(tenant key, frame(DST, vaultId, name, version)), so the
// vault host stores no tenant secret and a leaked database mints no tokens.
import { createHmac, timingSafeEqual } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { frame, toHex, u32be, utf8 } from '../../protocol/bytes.js';
import { DST } from '../../protocol/suite.js';

export interface TenantIdentity {
  tenant: string;
  version: number;
  /** Expiry (seconds since the epoch). */
  exp: number;
  sub?: string;
}

export interface AuthOptions {
  vaultId: Uint8Array;
  /** Is this tenant credential version active (not revoked)? */
  isActive(name: string, version: number): boolean;
  /** The tenant secret, from the HSM. */
  deriveSecret(input: Uint8Array): Promise<Uint8Array>;
  now(): number;
  skewSec?: number;
  maxLifetimeSec?: number;
}

export function tenantSecretInput(vaultId: Uint8Array, name: string, version: number): Uint8Array {
  return frame(DST.tenantSecret, vaultId, utf8(name), u32be(version));
}

const b64json = (o: object): string => Buffer.from(JSON.stringify(o)).toString('base64url');

/** Mint a token (bkv-admin, tests, and any backend that holds the tenant secret). */
export function mintToken(
  secret: Uint8Array,
  c: { tenant: string; version: number; vaultId: Uint8Array; ttlSec: number; now?: number; sub?: string },
): string {
  const iat = Math.floor((c.now ?? Date.now()) / 1000);
  const head = b64json({ alg: 'HS256', typ: 'JWT', kid: `${c.tenant}:${c.version}` });
  const body = b64json({ aud: toHex(c.vaultId), iat, exp: iat + c.ttlSec, ...(c.sub ? { sub: c.sub } : {}) });
  const mac = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${mac}`;
}

export class Authenticator {
  private readonly secrets = new Map<string, Uint8Array>();
  /**
   * Credentials revoked while this process runs ("tenant:version"). The database decides at
   * the upgrade; this set lets every request of an open connection be checked in O(1).
   * Bounded by the tenants table.
   */
  private readonly revokedKids = new Set<string>();
  private readonly audience: string;

  constructor(private readonly o: AuthOptions) {
    this.audience = toHex(o.vaultId);
  }

  /** Verify a bearer token. Every failure is UNAUTHENTICATED with a reason that holds no token bytes. */
  async verify(token: string | undefined): Promise<TenantIdentity> {
    const fail = (why: string): never => {
      throw new VaultError(ErrorCodes.UNAUTHENTICATED, `tenant token refused: ${why}`);
    };
    if (!token) return fail('missing bearer token');
    const parts = token.split('.');
    if (parts.length !== 3 || token.length > 4096) return fail('not a JWT');
    const [h, b, sig] = parts as [string, string, string];
    let head: { alg?: unknown; kid?: unknown };
    let claims: { aud?: unknown; iat?: unknown; exp?: unknown; sub?: unknown };
    try {
      head = JSON.parse(Buffer.from(h, 'base64url').toString('utf8'));
      claims = JSON.parse(Buffer.from(b, 'base64url').toString('utf8'));
    } catch {
      return fail('not a JWT');
    }
    // Only HS256: never let the token pick its own algorithm ("none", RS/HS confusion).
    if (head.alg !== 'HS256') return fail('algorithm must be HS256');
    const kid = typeof head.kid === 'string' ? /^([a-z0-9][a-z0-9_.-]{0,62}):([1-9][0-9]{0,8})$/.exec(head.kid) : null;
    if (!kid) return fail('kid must be "tenant:version"');
    const tenant = kid[1]!;
    const version = Number(kid[2]);
    if (!this.o.isActive(tenant, version)) return fail('unknown or revoked tenant credential');
    const secret = await this.secret(tenant, version);
    const want = createHmac('sha256', secret).update(`${h}.${b}`).digest();
    const got = Buffer.from(sig, 'base64url');
    if (got.length !== want.length || !timingSafeEqual(got, want)) return fail('bad signature');
    const now = Math.floor(this.o.now() / 1000);
    const skew = this.o.skewSec ?? 30;
    const { aud, iat, exp, sub } = claims;
    if (aud !== this.audience) return fail('audience is not this vault');
    if (typeof exp !== 'number' || typeof iat !== 'number') return fail('iat and exp are required');
    if (exp + skew < now) return fail('expired');
    if (iat - skew > now) return fail('issued in the future');
    if (exp - iat > (this.o.maxLifetimeSec ?? 86_400)) return fail('lifetime too long');
    return { tenant, version, exp, ...(typeof sub === 'string' ? { sub: sub.slice(0, 128) } : {}) };
  }

  /** Credential versions just revoked in the database: open connections holding them stop now. */
  revoked(tenant: string, versions: number[]): void {
    for (const v of versions) {
      this.revokedKids.add(`${tenant}:${v}`);
      this.secrets.delete(`${tenant}:${v}`);
    }
  }

  /** Was this connection's credential revoked since it was verified? */
  isRevoked(id: TenantIdentity): boolean {
    return this.revokedKids.has(`${id.tenant}:${id.version}`);
  }

  async secretFor(tenant: string, version: number): Promise<Uint8Array> {
    return this.secret(tenant, version);
  }

  private async secret(tenant: string, version: number): Promise<Uint8Array> {
    const k = `${tenant}:${version}`;
    let s = this.secrets.get(k);
    if (!s) {
      s = await this.o.deriveSecret(tenantSecretInput(this.o.vaultId, tenant, version));
      this.secrets.set(k, s);
    }
    return s;
  }
}
