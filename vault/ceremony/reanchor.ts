// Replacing a dead HSM with a clone made earlier (a standby): the clone holds
// the vault's keys, but its state anchor is where the source's stood when the
// bundle was made, and the live database has moved on since. The vault refuses
// a database ahead of its anchor by more than one batch, rightly: from the HSM's
// side it cannot tell "the live database" from "a database of another token".
// So the operators, with their witnesses, vouch for the database, and this step
// moves the clone's anchor forward to it. It never moves an anchor back: that
// would be the rollback the anchor exists to refuse.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { Token } from '../hsm/token.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { openDb } from '../store/db.js';
import { RecordStore } from '../store/records.js';
import { BucketTree, anchorLabel } from '../core/state-hash.js';
import { fromHex, toHex } from '../../protocol/bytes.js';
import { vaultIdOf } from '../../protocol/descriptor.js';
import { tokenAnchor } from './steps.js';

export interface ReanchorResult {
  fromSeq: number;
  toSeq: number;
  root: string;
  /** The anchor already stood there: nothing was written. */
  already: boolean;
}

/**
 * Move this token's anchor forward to the database at `dbPath`: the database
 * must belong to this token's vault and hash to its own recorded root (it was
 * not edited), and must be ahead of the anchor.
 */
export function reanchor(token: Token, dbPath: string, log: Logger): ReanchorResult {
  const r = enforcePolicy(token, { create: false });
  const vaultId = toHex(vaultIdOf(r.sig.point));
  const db = openDb(dbPath, { readonly: true });
  let seq: number;
  let root: string;
  try {
    const records = new RecordStore(db);
    const bound = records.getMeta('vault_id');
    if (bound !== vaultId) {
      throw new VaultError(
        ErrorCodes.CEREMONY_VAULT_MISMATCH,
        `the database belongs to vault ${bound ?? '(none: never opened)'}, but this HSM holds vault ${vaultId}; the anchor was not moved`,
      );
    }
    seq = Number(records.getMeta('state_seq') ?? '0');
    root = records.getMeta('state_root') ?? toHex(new BucketTree().root());
    if (toHex(new BucketTree(records.bucketHashes()).root()) !== root) {
      throw new VaultError(ErrorCodes.STATE_ROLLBACK_DETECTED, "the database's bucket hashes do not hash to its own recorded root: it was altered; the anchor was not moved");
    }
  } finally {
    db.close();
  }
  const cur = tokenAnchor(token, r);
  if (cur.seq === seq && cur.root === root) {
    log.info({ event: 'ceremony.reanchor', fromSeq: cur.seq, toSeq: seq, already: true }, 'ceremony: anchor already at the database');
    return { fromSeq: cur.seq, toSeq: seq, root, already: true };
  }
  if (cur.seq >= seq) {
    throw new VaultError(
      ErrorCodes.STATE_ROLLBACK_DETECTED,
      `the HSM anchor (batch ${cur.seq}) is not behind the database (batch ${seq}): moving it would roll the vault back; the anchor was not moved`,
    );
  }
  const label = anchorLabel(seq, fromHex(root));
  for (const h of r.anchors) token.setLabel(h, label);
  log.info({ event: 'ceremony.reanchor', fromSeq: cur.seq, toSeq: seq }, 'ceremony: anchor moved forward to the live database');
  return { fromSeq: cur.seq, toSeq: seq, root, already: false };
}
