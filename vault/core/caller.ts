// Who is calling the core. The RPC layer knows the authenticated tenant; the
// core needs it for per-tenant quotas (sessions.ts) and, later, for a record
// namespace. One object rather than loose parameters, so what the core learns
// about its caller grows in one place.
export interface CallerContext {
  /** The authenticated tenant name (vault/rpc/auth.ts). */
  readonly tenant: string;
}
