// The HSM port on this thread: each operation is a synchronous PKCS#11 call on
// one Token (tools, tests, hsm.workers "off"). Its one job beyond running the
// calls: when the login is lost under it, find the key set again by label.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { Token } from './token.js';
import { KeyTable, runJob, type KeySet } from './jobs.js';
import type { HsmOp, HsmPort, ResultOf } from './port.js';
import { HsmKeys } from './keys.js';

/** The vault's keys on `token`, this thread (see TokenPort for `resolve`). */
export function tokenKeys(token: Token, keys: KeySet, created: string[] = [], resolve?: () => KeySet): HsmKeys<TokenPort> {
  return new HsmKeys(new TokenPort(token, keys, created, resolve));
}

export class TokenPort implements HsmPort {
  private readonly table: KeyTable;
  readonly points: { kx: Uint8Array; sig: Uint8Array };

  constructor(
    private readonly token: Token,
    keys: KeySet,
    /** Labels created while resolving the key set (bkv-admin init reports them). */
    readonly created: string[] = [],
    /**
     * Finds the key set again by label (hsm-policy, without creating anything). Used
     * when the login was lost under us: SoftHSM then invalidates every private-object
     * handle, and without this the vault would answer HSM_ERROR until restarted.
     */
    private readonly resolve?: () => KeySet,
  ) {
    this.table = new KeyTable(keys);
    this.points = { kx: this.table.points.kx, sig: this.table.points.sig };
  }

  epochs(): number[] {
    return this.table.epochs();
  }

  async call<O extends HsmOp>(op: O): Promise<ResultOf<O>> {
    return this.table.settle(op, this.fresh(() => runJob(this.token, this.table.bind(op))));
  }

  async ping(): Promise<boolean> {
    return this.token.ping();
  }

  async close(): Promise<void> {
    this.token.close();
  }

  /**
   * Run one HSM call on handles known to be current. If the token saw a stale handle
   * (login lost: every session closed, C_Logout, a token reset), find the keys again
   * and retry once; until the token is back this fails with HSM_UNAVAILABLE, and the
   * first call after it returns succeeds (test/integration/adversarial-hsm.test.ts).
   */
  private fresh<T>(fn: () => T): T {
    if (this.token.handlesLost) this.reresolve();
    try {
      return fn();
    } catch (e) {
      if (!this.token.handlesLost || !this.resolve) throw e;
      try {
        this.reresolve();
        return fn();
      } catch (again) {
        // Still no usable keys (the token has not come back): nothing was done, retry later.
        if (this.token.handlesLost) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM unavailable: the login was lost and is not restored yet');
        throw again;
      }
    }
  }

  private reresolve(): void {
    if (!this.resolve) return;
    // The sessions may still be open but logged out: start over with fresh ones (a new login).
    this.token.resetSessions();
    this.table.replace(this.resolve());
    this.token.handlesLost = false;
  }
}
