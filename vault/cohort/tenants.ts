// Backend tenants on a cohort node (docs/COHORT.md, "Tenants"): the table lives
// in etcd, so `bkv-admin tenant add|revoke` on any node reaches every node.
//
// One etcd value per tenant name, written through the engine's commit() (a CAS
// txn committed by an etcd quorum), holding every credential version of that
// name. Its id is "7e" followed by SHA-256 hex of "bkv-cohort-tenant-v1" ‖ name:
// 66 hex digits, where a record id (core/record-log.ts) has 64, so the two can
// never meet and the applier can tell a tenant key by its shape alone. The
// value's JSON carries the name, checked against the id on decode: a value
// copied under another tenant's id is refused (treated as no tenant).
//
// Reads (isActive, home, list: every upgrade and request) are served from an
// in-memory table kept by the replica the engine applies to: observe() wraps
// that replica, and every tenant value applied (watch, snapshot) updates the
// table, then tells the listeners which versions went from active to revoked.
// The daemon closes those tenants' open connections from there, so a
// revocation made on any node cuts them off on every node as soon as that node
// applies it. add() and revoke() resolve once quorum-committed and applied here.
//
// Migration (once per cohort): a node that starts with tenants in its local
// vault.db while etcd has no import marker yet writes the marker (CAS, so of
// nodes racing only one wins) holding its table, or an empty one when etcd
// already has tenants. Every node then writes the marker's tenants that etcd
// lacks (create-only, idempotent), and one whose local table differs from
// etcd's logs it; etcd's is the one used.
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { checkTenantName, type Tenant, type TenantDirectory } from '../store/tenants.js';
import type { CohortLedger } from './ledger.js';
import { decodeEnvelope } from './envelope.js';
import type { ObservedReplica, Replica, ReplicaOp } from './replica.js';

const TAG = '7e';
const ID_HEX = 66;
const NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

/** The engine's record id of a tenant name. */
export function cohortTenantId(name: string): string {
  return TAG + createHash('sha256').update('bkv-cohort-tenant-v1').update(name).digest('hex');
}

/** The id of the one-per-cohort import marker (same shape as a tenant id; its own domain string). */
export const TENANT_IMPORT_ID = TAG + createHash('sha256').update('bkv-cohort-tenant-import-v1').digest('hex');

export interface TenantVersion {
  version: number;
  state: 'active' | 'revoked';
  createdAt: number;
  revokedAt: number | null;
}

export interface CohortTenant {
  name: string;
  namespace: string;
  versions: TenantVersion[];
}

interface TenantWire {
  v: 1;
  k: 'tenant';
  name: string;
  namespace: string;
  versions: TenantVersion[];
}

interface ImportWire {
  v: 1;
  k: 'tenant-import';
  node: string;
  at: number;
  tenants: CohortTenant[];
}

function corrupt(what: string): VaultError {
  return new VaultError(ErrorCodes.RECORD_CORRUPT, `cohort: ${what} in etcd is not one of this vault`);
}

const isVersion = (x: TenantVersion) =>
  Number.isSafeInteger(x?.version) && x.version >= 1 &&
  (x.state === 'active' || x.state === 'revoked') &&
  Number.isFinite(x.createdAt) && (x.revokedAt === null || Number.isFinite(x.revokedAt));

const isTenant = (t: CohortTenant) =>
  typeof t?.name === 'string' && NAME.test(t.name) && typeof t.namespace === 'string' &&
  Array.isArray(t.versions) && t.versions.every(isVersion);

function clean(t: CohortTenant): CohortTenant {
  return {
    name: t.name,
    namespace: t.namespace,
    versions: t.versions.map((v) => ({ version: v.version, state: v.state, createdAt: v.createdAt, revokedAt: v.revokedAt })),
  };
}

export function encodeTenant(t: CohortTenant): Uint8Array {
  const w: TenantWire = { v: 1, k: 'tenant', ...clean(t) };
  return new Uint8Array(Buffer.from(JSON.stringify(w), 'utf8'));
}

/** A tenant value read under `id`: RECORD_CORRUPT unless it is a tenant whose name hashes to `id`. */
export function decodeTenant(id: string, raw: Uint8Array): CohortTenant {
  let w: TenantWire;
  try {
    w = JSON.parse(Buffer.from(raw).toString('utf8')) as TenantWire;
  } catch {
    throw corrupt('a tenant value');
  }
  if (w?.v !== 1 || w.k !== 'tenant' || !isTenant(w) || cohortTenantId(w.name) !== id) throw corrupt('a tenant value');
  return clean(w);
}

function encodeImport(w: Omit<ImportWire, 'v' | 'k'>): Uint8Array {
  return new Uint8Array(Buffer.from(JSON.stringify({ v: 1, k: 'tenant-import', ...w, tenants: w.tenants.map(clean) }), 'utf8'));
}

function decodeImport(raw: Uint8Array): ImportWire {
  let w: ImportWire;
  try {
    w = JSON.parse(Buffer.from(raw).toString('utf8')) as ImportWire;
  } catch {
    throw corrupt('the tenant import marker');
  }
  if (w?.v !== 1 || w.k !== 'tenant-import' || !Array.isArray(w.tenants) || !w.tenants.every(isTenant)) throw corrupt('the tenant import marker');
  return w;
}

/** The local table's rows, grouped per name as etcd holds them. */
export function groupTenants(list: readonly Tenant[]): CohortTenant[] {
  const by = new Map<string, CohortTenant>();
  for (const t of list) {
    let e = by.get(t.name);
    if (!e) by.set(t.name, (e = { name: t.name, namespace: t.namespace, versions: [] }));
    e.versions.push({ version: t.version, state: t.state, createdAt: t.createdAt, revokedAt: t.revokedAt });
  }
  for (const e of by.values()) e.versions.sort((a, b) => a.version - b.version);
  return [...by.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

const activeOf = (t: CohortTenant | undefined) => new Set((t?.versions ?? []).filter((v) => v.state === 'active').map((v) => v.version));

export type RevokedListener = (name: string, versions: number[]) => void;

export interface MigrationResult {
  /** Tenants this node wrote into etcd from the marker (0 when another node had, or none were to copy). */
  written: number;
  /** Names on which this node's local table and etcd's disagree (etcd's is used). */
  differ: string[];
}

export class CohortTenants implements TenantDirectory {
  /** etcd key → tenant, as applied on this node. */
  private readonly byKey = new Map<string, CohortTenant>();
  private readonly byName = new Map<string, CohortTenant>();
  private readonly listeners: RevokedListener[] = [];
  private readonly space: string;
  private ledger: CohortLedger | undefined;

  constructor(
    /** The engine's etcd prefix (CohortLedgerOptions.prefix). */
    prefix: string,
    private readonly log?: Logger,
  ) {
    this.space = `${prefix}/r/${TAG}`;
  }

  /** Is this etcd key in the tenants' id space (a tenant or the import marker)? Such keys are not records. */
  owns(key: string): boolean {
    return key.startsWith(this.space) && key.length === this.space.length - TAG.length + ID_HEX;
  }

  /**
   * Follow the replica the engine applies to: every tenant value it applies (or
   * loads from a snapshot) also updates this table. Loads the tenants it holds now.
   */
  follow(r: ObservedReplica): void {
    this.reload(r);
    r.listen({ apply: (ops) => this.applied(ops), reset: () => this.reload(r) });
  }

  /** The engine that commits this node's changes (started, on the replica observe() returned). */
  attach(ledger: CohortLedger): void {
    this.ledger = ledger;
  }

  /** Called with the versions of a tenant that stopped being active here, as soon as this node applied that. */
  onRevoked(f: RevokedListener): void {
    this.listeners.push(f);
  }

  isActive(name: string, version: number): boolean {
    return this.byName.get(name)?.versions.some((v) => v.version === version && v.state === 'active') ?? false;
  }

  home(name: string): string {
    return this.byName.get(name)?.namespace ?? name;
  }

  list(): Tenant[] {
    const names = [...this.byName.keys()].sort();
    return names.flatMap((n) => {
      const t = this.byName.get(n)!;
      return t.versions.map((v) => ({ name: t.name, version: v.version, state: v.state, createdAt: v.createdAt, revokedAt: v.revokedAt, namespace: t.namespace }));
    });
  }

  /** Adds a tenant or a new credential version (keeping its namespace); resolves once quorum-committed and applied here. */
  async add(name: string, now: number): Promise<number> {
    checkTenantName(name);
    const ledger = this.engine();
    const id = cohortTenantId(name);
    const r = await ledger.commit(id, (cur) => {
      const t = cur ? decodeTenant(id, cur) : undefined;
      const version = (t?.versions.reduce((m, v) => Math.max(m, v.version), 0) ?? 0) + 1;
      return encodeTenant({
        name,
        namespace: t?.namespace ?? name,
        versions: [...(t?.versions ?? []), { version, state: 'active', createdAt: now, revokedAt: null }],
      });
    });
    await ledger.waitApplied(r.revision);
    // r.value is this op's result, even when others on the same key went in the same txn.
    return decodeTenant(id, r.value!).versions.reduce((m, v) => Math.max(m, v.version), 0);
  }

  /** Revokes every active version, or only `version`; resolves once quorum-committed and applied here (on every node soon after). */
  async revoke(name: string, now: number, version?: number): Promise<number> {
    if (!NAME.test(name)) return 0;
    const ledger = this.engine();
    const id = cohortTenantId(name);
    let n = 0;
    const r = await ledger.commit(id, (cur) => {
      // Only the run the quorum accepted counts: each run starts from zero.
      n = 0;
      if (!cur) return undefined;
      const t = decodeTenant(id, cur);
      const versions = t.versions.map((v) => {
        if (v.state !== 'active' || (version !== undefined && v.version !== version)) return v;
        n++;
        return { ...v, state: 'revoked' as const, revokedAt: now };
      });
      return n > 0 ? encodeTenant({ ...t, versions }) : undefined;
    });
    if (n > 0) await ledger.waitApplied(r.revision);
    return n;
  }

  /**
   * The one-time copy of a node's local tenants into etcd (header comment).
   * Call once the engine has started, before serving.
   */
  async migrate(local: readonly Tenant[], nodeId: string, now = Date.now()): Promise<MigrationResult> {
    const ledger = this.engine();
    let marker = (await ledger.read(TENANT_IMPORT_ID)).value;
    if (!marker && local.length > 0) {
      const mine = groupTenants(local);
      const r = await ledger.commit(TENANT_IMPORT_ID, (cur) => {
        if (cur) return undefined;
        // Tenants added through a node before any import: etcd's table is the cohort's already.
        return encodeImport({ node: nodeId, at: now, tenants: this.byName.size > 0 ? [] : mine });
      });
      await ledger.waitApplied(r.revision);
      marker = r.value;
    }
    let written = 0;
    if (marker) {
      const m = decodeImport(marker);
      const missing = m.tenants.filter((t) => !this.byName.has(t.name));
      const results = await Promise.all(
        missing.map((t) => {
          const id = cohortTenantId(t.name);
          // Create-only: a tenant etcd has (written by a node racing this one, or changed since) stays as it is.
          return ledger.commit(id, (cur) => (cur ? undefined : encodeTenant(t)));
        }),
      );
      written = results.filter((r) => r.changed).length;
      const top = results.reduce((m2, r) => (r.revision > m2 ? r.revision : m2), 0n);
      if (top > 0n) await ledger.waitApplied(top);
      if (written > 0) {
        this.log?.info({ event: 'cohort.tenants.import', node: nodeId, from: m.node, written }, 'tenants copied into etcd from the import marker');
      }
    }
    const differ = this.differences(local);
    if (differ.length > 0) {
      this.log?.warn(
        { event: 'cohort.tenants.differ', names: differ.slice(0, 50), count: differ.length },
        "this node's local tenants table differs from the cohort's; the cohort's (etcd) is used",
      );
    }
    return { written, differ };
  }

  private differences(local: readonly Tenant[]): string[] {
    const out: string[] = [];
    const mine = new Map(groupTenants(local).map((t) => [t.name, t]));
    for (const name of new Set([...mine.keys(), ...(local.length > 0 ? this.byName.keys() : [])])) {
      const a = mine.get(name);
      const b = this.byName.get(name);
      const key = (t: CohortTenant | undefined) => JSON.stringify(t ? [t.namespace, t.versions.map((v) => [v.version, v.state])] : null);
      if (key(a) !== key(b)) out.push(name);
    }
    return out.sort();
  }

  private engine(): CohortLedger {
    if (!this.ledger) throw new VaultError(ErrorCodes.INTERNAL, 'cohort: the tenant directory has no engine yet');
    return this.ledger;
  }

  /** The tenant a raw replica value holds under `key`; undefined (no tenant: nothing is active) for anything else. */
  private parse(key: string, raw: Uint8Array | undefined): CohortTenant | undefined {
    if (!raw) return undefined;
    const id = key.slice(this.space.length - TAG.length);
    if (id === TENANT_IMPORT_ID) return undefined;
    try {
      const env = decodeEnvelope(raw);
      if (!env) throw corrupt('a tenant value');
      return env.payload ? decodeTenant(id, env.payload) : undefined;
    } catch (e) {
      // Never thrown into the applier (that would stop the engine): the tenant fails closed.
      this.log?.error({ event: 'cohort.tenant.corrupt', key, err: (e as Error).message }, 'a tenant value in etcd is not one of this vault; treated as no tenant');
      return undefined;
    }
  }

  private set(key: string, t: CohortTenant | undefined): void {
    const before = this.byKey.get(key);
    if (before) this.byName.delete(before.name);
    if (t) {
      this.byKey.set(key, t);
      this.byName.set(t.name, t);
    } else this.byKey.delete(key);
    const now = activeOf(t);
    const gone = [...activeOf(before)].filter((v) => !now.has(v)).sort((a, b) => a - b);
    if (before && gone.length > 0) this.emit(before.name, gone);
  }

  private applied(ops: readonly ReplicaOp[]): void {
    for (const op of ops) {
      if (!this.owns(op.key)) continue;
      this.set(op.key, op.type === 'put' ? this.parse(op.key, op.value) : undefined);
    }
  }

  private reload(inner: Replica): void {
    const keys = new Set(inner.keys(this.space).filter((k) => this.owns(k)));
    for (const k of [...this.byKey.keys()]) if (!keys.has(k)) this.set(k, undefined);
    for (const k of keys) this.set(k, this.parse(k, inner.get(k)?.value));
  }

  private emit(name: string, versions: number[]): void {
    for (const f of this.listeners) {
      try {
        f(name, versions);
      } catch (e) {
        this.log?.error({ event: 'cohort.tenant.listener', err: (e as Error).message }, 'a tenant revocation listener failed');
      }
    }
  }
}
