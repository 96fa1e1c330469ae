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
  /** Its home namespace (core/namespace.ts): its own name, or "_legacy" for tenants from before namespaces. */
  namespace: string;
}

const NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

export function checkTenantName(name: string): string {
  if (!NAME.test(name)) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'tenant name must be 1-63 characters of a-z, 0-9, "_", "." or "-"');
  }
  return name;
}

/**
 * Where the daemon reads and changes tenants. A single node: this file's SQLite
 * table (TenantStore). A cohort node: etcd through the replication engine, read
 * from the node's applied replica (cohort/tenants.ts, docs/COHORT.md "Tenants").
 * Reads are synchronous and cheap (every upgrade and request uses them); a change
 * returns once durable (single node) or resolves once quorum-committed and applied
 * on this node (cohort): callers await either.
 */
export interface TenantDirectory {
  isActive(name: string, version: number): boolean;
  home(name: string): string;
  list(): Tenant[];
  /** The new credential version. */
  add(name: string, now: number): number | Promise<number>;
  /** How many active versions were revoked (0: none matched). */
  revoke(name: string, now: number, version?: number): number | Promise<number>;
}

export class TenantStore implements TenantDirectory {
  private readonly activeStmt;
  private readonly maxStmt;
  private readonly insertStmt;
  private readonly revokeStmt;
  private readonly revokeVersionStmt;
  private readonly listStmt;
  private readonly homeStmt;

  constructor(private readonly db: Db) {
    this.activeStmt = db.prepare<[string, number], { n: number }>(
      'SELECT count(*) AS n FROM tenants WHERE name = ? AND version = ? AND state = 1',
    );
    this.maxStmt = db.prepare<[string], { v: number | null }>('SELECT max(version) AS v FROM tenants WHERE name = ?');
    // A new credential version keeps the home namespace of the versions before it.
    this.insertStmt = db.prepare(
      `INSERT INTO tenants (name, version, state, created_at, namespace)
       VALUES (?, ?, 1, ?, (SELECT namespace FROM tenants WHERE name = ? ORDER BY version DESC LIMIT 1))`,
    );
    this.revokeStmt = db.prepare('UPDATE tenants SET state = 2, revoked_at = ? WHERE name = ? AND state = 1');
    this.revokeVersionStmt = db.prepare('UPDATE tenants SET state = 2, revoked_at = ? WHERE name = ? AND version = ? AND state = 1');
    this.listStmt = db.prepare<
      [],
      { name: string; version: number; state: number; created_at: number; revoked_at: number | null; namespace: string | null }
    >('SELECT * FROM tenants ORDER BY name, version');
    this.homeStmt = db.prepare<[string], { namespace: string | null }>(
      'SELECT namespace FROM tenants WHERE name = ? ORDER BY version DESC LIMIT 1',
    );
  }

  /** The namespace a tenant's requests act in when they name none: its own name unless migration 5 made it "_legacy". */
  home(name: string): string {
    return this.homeStmt.get(name)?.namespace ?? name;
  }

  isActive(name: string, version: number): boolean {
    return this.activeStmt.get(name, version)!.n > 0;
  }

  /** Add a tenant, or a new credential version of an existing one (older versions stay valid until revoked). */
  add(name: string, now: number): number {
    checkTenantName(name);
    return this.db.transaction(() => {
      const version = (this.maxStmt.get(name)!.v ?? 0) + 1;
      this.insertStmt.run(name, version, now, name);
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
      namespace: r.namespace ?? r.name,
    }));
  }
}
