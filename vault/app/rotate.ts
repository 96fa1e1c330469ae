// The seal-epoch rotation as an operator asks for it, written once: the daemon's
// admin listener and an offline bkv-admin both turn `rotate` options into the
// vault's own call here, so which options reach which kind of rotation is decided
// in one place. A cohort node rotates across the cohort (cohort/keyring.ts);
// bkv-admin offline opens a single node's vault, so it asks with `cohort` false.
import type { Vault } from '../core/vault.js';

export interface RotateRequest {
  resume: boolean;
  /** Records per anchored batch; a single node only (a cohort re-seals through etcd). */
  batchSize?: number;
  /** A cohort's wait for the other nodes to import the new epoch and destroy the old. */
  waitSec?: number;
}

export function rotate(
  vault: Pick<Vault, 'rotate' | 'rotateCohort'>,
  o: RotateRequest,
  onProgress: (done: number, remaining: number) => void,
  cohort: boolean,
): ReturnType<Vault['rotate']> | ReturnType<Vault['rotateCohort']> {
  return cohort
    ? vault.rotateCohort({ resume: o.resume, ...(o.waitSec ? { waitMs: o.waitSec * 1000 } : {}), onProgress })
    : vault.rotate({ resume: o.resume, ...(o.batchSize ? { batchSize: o.batchSize } : {}), onProgress });
}
