// The tenant operations, written once. The daemon's admin listener runs them on
// the directory it serves (vault.db, or etcd on a cohort node) and bkv-admin runs
// them offline on vault.db while the daemon is stopped; both must add, revoke and
// mint alike and leave the same log (and so audit) lines. What differs stays with
// the caller: the daemon cuts off open connections, bkv-admin refuses a cohort
// node and signs the audit log.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { mintToken, tenantSecretInput } from '../rpc/auth.js';
import type { Tenant, TenantDirectory } from '../store/tenants.js';
import type { VaultKeys } from '../hsm/vault-keys.js';

export interface TenantDeps {
  tenants: Pick<TenantDirectory, 'add' | 'revoke' | 'list'>;
  /** A credential version's secret. The daemon's comes cached from its Authenticator; offline, straight from the HSM. */
  secretFor(name: string, version: number): Promise<Uint8Array>;
  vaultId: Uint8Array;
  /** limits.tokenMaxLifetimeSec: a longer token would be refused by the vault it is minted for. */
  tokenMaxLifetimeSec: number;
  log: Logger;
}

/** The secret as the Authenticator derives it, for a caller that holds the HSM keys but runs no Authenticator. */
export function hsmTenantSecret(keys: Pick<VaultKeys, 'tenantSecret'>, vaultId: Uint8Array): TenantDeps['secretFor'] {
  return (name, version) => keys.tenantSecret(tenantSecretInput(vaultId, name, version));
}

// Names reach the message from the network (admin API) too: bounded like a valid name.
const notFound = (name: string, version?: number): VaultError =>
  new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no active tenant "${name.slice(0, 63)}"${version === undefined ? '' : ` version ${version}`}`);

/** The newest active credential version of `name`, the one a minted token should name (0: none). */
export function newestActiveVersion(list: readonly Tenant[], name: string): number {
  return list.filter((t) => t.name === name && t.state === 'active').reduce((m, t) => Math.max(m, t.version), 0);
}

/** A new tenant, or a new credential version of one; its secret is shown to the operator once, here. */
export async function addTenant(deps: Pick<TenantDeps, 'tenants' | 'secretFor' | 'log'>, name: string): Promise<{ name: string; version: number; secret: string }> {
  const version = await deps.tenants.add(name, Date.now());
  const secret = await deps.secretFor(name, version);
  deps.log.info({ event: 'tenant.add', tenant: name, version }, 'tenant credential added');
  return { name, version, secret: Buffer.from(secret).toString('hex') };
}

/**
 * Revoke every active version of `name`, or only `version`. `cutOff` is the daemon's: it gets
 * the versions just revoked and closes the connections holding them (resolving with how many),
 * before the log line, so that line says the tokens have stopped working. Offline nothing is
 * open, so nothing is closed.
 */
export async function revokeTenant(
  deps: Pick<TenantDeps, 'tenants' | 'log'>,
  name: string,
  version?: number,
  cutOff?: (versions: number[]) => Promise<number>,
): Promise<{ name: string; revoked: number; versions: number[]; connectionsClosed: number }> {
  // Read before the change: afterwards they are no longer active, and the caller needs them.
  const versions = deps.tenants
    .list()
    .filter((t) => t.name === name && t.state === 'active' && (version === undefined || t.version === version))
    .map((t) => t.version);
  const revoked = await deps.tenants.revoke(name, Date.now(), version);
  if (revoked === 0) throw notFound(name, version);
  const connectionsClosed = cutOff ? await cutOff(versions) : 0;
  deps.log.info({ event: 'tenant.revoke', tenant: name, revoked, versions, connectionsClosed }, 'tenant credentials revoked');
  return { name, revoked, versions, connectionsClosed };
}

/** A tenant JWT for the newest active version of `name`: for tests and for bootstrapping a backend. */
export async function mintTenantToken(
  deps: TenantDeps,
  name: string,
  ttlSec: number,
  sub?: string,
): Promise<{ name: string; version: number; token: string; expiresAt: string }> {
  if (ttlSec > deps.tokenMaxLifetimeSec) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `ttl over limits.tokenMaxLifetimeSec (${deps.tokenMaxLifetimeSec} s): the vault would refuse the token`);
  }
  const version = newestActiveVersion(deps.tenants.list(), name);
  if (!version) throw notFound(name);
  const token = mintToken(await deps.secretFor(name, version), { tenant: name, version, vaultId: deps.vaultId, ttlSec, ...(sub ? { sub } : {}) });
  deps.log.info({ event: 'tenant.token', tenant: name, version, ttlSec }, 'tenant token minted');
  return { name, version, token, expiresAt: new Date(Date.now() + ttlSec * 1000).toISOString() };
}
