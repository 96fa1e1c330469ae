// Record namespaces (issue 14, finding 5; threat model R8, R6). A record
// belongs to a namespace; a tenant's own namespace is named after it, so the
// same user id under two tenants is two independent records. Pure: no I/O.
//
// - The record key, which the store, the state tree, the undo log and the
//   session table all use, is derived from (namespace, user id). Records made
//   before namespaces live in LEGACY_NAMESPACE, whose key is the bare user id:
//   their rows, leaf hashes, buckets and the anchored root stay exactly as they
//   were, so no migration has to rewrite a row or the HSM anchor.
// - Every other namespace's key is "<namespace> US <user id>" (US = U+001F).
//   User ids may hold no control character (core/input.ts) and namespaces are
//   tenant names, so the mapping is one-to-one and no key of one namespace
//   can equal a key of another.
// - The namespace is part of the verifier's and the seal's binding too
//   (core/binding.ts): a row copied to another namespace's key does not open.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

/** Where records enrolled before namespaces are, and the home of tenants that existed then. */
export const LEGACY_NAMESPACE = '_legacy';

const SEP = '\u001f';
/** A tenant name (store/tenants.ts), or the legacy namespace. */
const NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

export function isNamespace(v: unknown): v is string {
  return typeof v === 'string' && (v === LEGACY_NAMESPACE || NAME.test(v));
}

export function checkNamespace(v: unknown): string {
  if (!isNamespace(v)) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `namespace must be a tenant name (1-63 of a-z, 0-9, "_", ".", "-") or "${LEGACY_NAMESPACE}"`);
  }
  return v;
}

/** The key a record is stored, hashed and locked under. `userId` is already checked. */
export function recordKey(namespace: string, userId: string): string {
  return namespace === LEGACY_NAMESPACE ? userId : `${namespace}${SEP}${userId}`;
}

/** The inverse of recordKey. */
export function parseRecordKey(key: string): { namespace: string; userId: string } {
  const i = key.indexOf(SEP);
  return i < 0 ? { namespace: LEGACY_NAMESPACE, userId: key } : { namespace: key.slice(0, i), userId: key.slice(i + 1) };
}

/**
 * Which namespaces a tenant may act in: its home (its own name, or the legacy
 * namespace for tenants that existed before namespaces: store/db.ts migration 5)
 * and the namespaces the configuration grants it (tenants.grants).
 */
export interface NamespacePolicy {
  home(tenant: string): string;
  granted(tenant: string): readonly string[];
}

/** Without a policy (in-process tools and tests) every tenant's home is the legacy namespace. */
export const LEGACY_ONLY: NamespacePolicy = { home: () => LEGACY_NAMESPACE, granted: () => [] };

/**
 * The namespace a request acts in: the tenant's home, or `requested` when that is
 * its home or granted to it. Anything else is NAMESPACE_NOT_GRANTED, decided before
 * any record is read, so the refusal says nothing about the namespace's users.
 */
export function resolveNamespace(policy: NamespacePolicy, tenant: string, requested: unknown): string {
  const home = policy.home(tenant);
  if (requested === undefined) return home;
  const ns = checkNamespace(requested);
  if (ns === home || policy.granted(tenant).includes(ns)) return ns;
  throw new VaultError(ErrorCodes.NAMESPACE_NOT_GRANTED, `namespace "${ns}" is not granted to this tenant (tenants.grants)`);
}
