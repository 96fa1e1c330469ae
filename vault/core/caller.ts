// Who is calling the core. The RPC layer knows the authenticated tenant; the
// core needs it for per-tenant quotas (sessions.ts) and for the record
// namespace the call acts in (namespace.ts). One object rather than loose
// parameters, so what the core learns about its caller grows in one place.
export interface CallerContext {
  /** The authenticated tenant name (vault/rpc/auth.ts). */
  readonly tenant: string;
  /**
   * The namespace this call's records are in, already checked against the tenant's
   * grants (rpc/methods.ts: resolveNamespace). Absent: the legacy namespace, which is
   * what in-process operator tools and callers from before namespaces mean.
   */
  readonly namespace?: string;
}
