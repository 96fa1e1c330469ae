// A record as the vault's logic sees it: one user's enrolment (or what is left
// of it). One definition for the store (which persists it), the state hash
// (which anchors it), the cohort (which replicates it) and the flows.
import type { KdfParams } from '../../protocol/kdf.js';

export type RecordState = 'active' | 'locked' | 'deleted';

export interface StoredRecord {
  /**
   * The record key (core/namespace.ts): the user id for the legacy namespace, "<namespace>
   * U+001F <user id>" for every other. The column keeps its name: rows of the legacy
   * namespace are the rows written before namespaces, unchanged.
   */
  userId: string;
  state: RecordState;
  /** Bumped on every enrolment for this user; bound into the verifier and the seal. */
  generation: number;
  attempts: number;
  attemptLimit: number;
  /** null once the record is locked or deleted. */
  verifier: Uint8Array | null;
  sealed: Uint8Array | null;
  sealEpoch: number | null;
  kdf: KdfParams | null;
  createdAt: number;
  updatedAt: number;
}
