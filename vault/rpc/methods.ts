// The public method table: nothing outside it is reachable from the socket.
// Operator actions (init, rotation, tenants) live in bkv-admin, never here.
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import type { CallerContext, Vault } from '../core/vault.js';
import { toB64 } from '../../protocol/bytes.js';
import type { ChannelTable, ChannelMethod } from './channels.js';
import { ChannelParams, EmptyParams, UserParams, parse } from './wire.js';
import { recordKey, resolveNamespace, type NamespacePolicy } from '../core/namespace.js';

export const VERSION = '0.1.0';

export interface CallResult {
  result: unknown;
  /** What happened, for the request log and metrics (e.g. "ok", "wrong-password", "LOCKED"). */
  outcome: string;
  /** For per-user rate limits and pseudonymous logging: the record key (core/namespace.ts), not the bare user id. */
  userId?: string;
}

/** `ctx`: the authenticated caller, for the core methods that need it. */
export type Handler = (params: unknown, ctx: CallerContext, beforeWork: (userId?: string) => void) => Promise<CallResult>;

/**
 * `namespaces`: each tenant's home namespace and the others the configuration grants it.
 * Every method that names a user acts in the tenant's home unless its `namespace` param
 * names a granted one; another tenant's users are then simply not there (absent, not found).
 */
export function methodTable(vault: Vault, channels: ChannelTable, namespaces: NamespacePolicy): Record<string, Handler> {
  // Resolved before any record is read or any limit taken: an ungranted namespace costs nothing and reveals nothing.
  const scoped = (ctx: CallerContext, p: { userId: string; namespace?: string | undefined }) => {
    const namespace = resolveNamespace(namespaces, ctx.tenant, p.namespace);
    return { ctx: { tenant: ctx.tenant, namespace }, key: recordKey(namespace, p.userId) };
  };
  const channel =
    (m: ChannelMethod): Handler =>
    async (params, ctx, beforeWork) => {
      const p = parse(ChannelParams, params);
      const s = scoped(ctx, p);
      beforeWork(s.key);
      const r = await channels.handle(s.ctx, m, p);
      return { result: { channel: { n: r.n, ct: r.ct } }, outcome: r.outcome, userId: s.key };
    };
  return {
    'vault.descriptor': async (params, _ctx, beforeWork) => {
      parse(EmptyParams, params ?? {});
      beforeWork();
      const d = await vault.descriptor();
      return {
        result: {
          descriptor: {
            version: d.version,
            vaultId: toB64(d.vaultId),
            channelKey: toB64(d.channelKey),
            epoch: d.epoch,
            attemptLimit: d.attemptLimit,
            kdfFloor: d.kdfFloor,
            signature: toB64(d.signature),
          },
          now: vault.options.now(),
        },
        outcome: 'ok',
      };
    },
    'enroll.begin': channel('enroll.begin'),
    'enroll.finish': channel('enroll.finish'),
    'recover.begin': channel('recover.begin'),
    'recover.finish': channel('recover.finish'),
    'record.status': async (params, ctx, beforeWork) => {
      const p = parse(UserParams, params);
      const s = scoped(ctx, p);
      beforeWork(s.key);
      return { result: await vault.currentStatus(p.userId, s.ctx), outcome: 'ok', userId: s.key };
    },
    'record.delete': async (params, ctx, beforeWork) => {
      const p = parse(UserParams, params);
      const s = scoped(ctx, p);
      beforeWork(s.key);
      await vault.delete(p.userId, s.ctx);
      return { result: { deleted: true }, outcome: 'ok', userId: s.key };
    },
    health: async (params, _ctx, beforeWork) => {
      parse(EmptyParams, params ?? {});
      beforeWork();
      if (!(await vault.keys.ping())) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM not answering');
      return { result: { status: 'ok', version: VERSION }, outcome: 'ok' };
    },
  };
}
