// The public method table: nothing outside it is reachable from the socket.
// Operator actions (init, rotation, tenants) live in bkv-admin, never here.
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import type { CallerContext, Vault } from '../core/vault.js';
import { toB64 } from '../../protocol/bytes.js';
import type { ChannelTable, ChannelMethod } from './channels.js';
import { ChannelParams, EmptyParams, UserParams, parse } from './wire.js';

export const VERSION = '0.1.0';

export interface CallResult {
  result: unknown;
  /** What happened, for the request log and metrics (e.g. "ok", "wrong-password", "LOCKED"). */
  outcome: string;
  /** For per-user rate limits and pseudonymous logging. */
  userId?: string;
}

/** `ctx`: the authenticated caller, for the core methods that need it. */
export type Handler = (params: unknown, ctx: CallerContext, beforeWork: (userId?: string) => void) => Promise<CallResult>;

export function methodTable(vault: Vault, channels: ChannelTable): Record<string, Handler> {
  const channel =
    (m: ChannelMethod): Handler =>
    async (params, ctx, beforeWork) => {
      const p = parse(ChannelParams, params);
      beforeWork(p.userId);
      const r = await channels.handle(ctx, m, p);
      return { result: { channel: { n: r.n, ct: r.ct } }, outcome: r.outcome, userId: p.userId };
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
    'record.status': async (params, _ctx, beforeWork) => {
      const { userId } = parse(UserParams, params);
      beforeWork(userId);
      return { result: vault.status(userId), outcome: 'ok', userId };
    },
    'record.delete': async (params, _ctx, beforeWork) => {
      const { userId } = parse(UserParams, params);
      beforeWork(userId);
      await vault.delete(userId);
      return { result: { deleted: true }, outcome: 'ok', userId };
    },
    health: async (params, _ctx, beforeWork) => {
      parse(EmptyParams, params ?? {});
      beforeWork();
      if (!vault.keys.ping()) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM not answering');
      return { result: { status: 'ok', version: VERSION }, outcome: 'ok' };
    },
  };
}
