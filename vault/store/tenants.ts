// Backend tenants: who may call the vault. The table holds names, versions and
// revocations only; a tenant's secret is derived on demand inside the HSM.
import type { Db } from './db.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

export interface Tenant {
  name: string;
  version: number;
  state: 'active' | 'revoked';
  createdAt: number;
  revokedAt: number | null;
}

const NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

export function checkTenantName(name: string): string {
  if (!NAME.test(name)) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'tenant name must be 1-63 characters of a-z, 0-9, "_", "." or "-"');
  }
  return name;
}

export class TenantStore {
  private readonly activeStmt;
  private readonly maxStmt;
  private readonly insertStmt;
  private readonly revokeStmt;
  private readonly revokeVersionStmt;
  private readonly listStmt;

  constructor(private readonly db: Db) {
    this.activeStmt = db.prepare<[string, number], { n: number }>(
      'SELECT count(*) AS n FROM tenants WHERE name = ? AND version = ? AND state = 1',
    );
    this.maxStmt = db.prepare<[string], { v: number | null }>('SELECT max(version) AS v FROM tenants WHERE name = ?');
    this.insertStmt = db.prepare('INSERT INTO tenants (name, version, state, created_at) VALUES (?, ?, 1, ?)');
    this.revokeStmt = db.prepare('UPDATE tenants SET state = 2, revoked_at = ? WHERE name = ? AND state = 1');
    this.revokeVersionStmt = db.prepare('UPDATE tenants SET state = 2, revoked_at = ? WHERE name = ? AND version = ? AND state = 1');
    this.listStmt = db.prepare<[], { name: string; version: number; state: number; created_at: number; revoked_at: number | null }>(
      'SELECT * FROM tenants ORDER BY name, version',
    );
  }

  isActive(name: string, version: number): boolean {
    return this.activeStmt.get(name, version)!.n > 0;
  }

  /** Add a tenant, or a new credential version of an existing one (older versions stay valid until revoked). */
  add(name: string, now: number): number {
    checkTenantName(name);
    return this.db.transaction(() => {
      const version = (this.maxStmt.get(name)!.v ?? 0) + 1;
      this.insertStmt.run(name, version, now);
      return version;
    }).immediate();
  }

  /** Revoke every active version of a tenant, or only `version`; returns how many were revoked. */
  revoke(name: string, now: number, version?: number): number {
    return (version === undefined ? this.revokeStmt.run(now, name) : this.revokeVersionStmt.run(now, name, version)).changes;
  }

  list(): Tenant[] {
    return this.listStmt.all().map((r) => ({
      name: r.name,
      version: r.version,
      state: r.state === 1 ? 'active' : 'revoked',
      createdAt: r.created_at,
      revokedAt: r.revoked_at,
    }));
  }
}
