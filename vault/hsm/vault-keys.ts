// The vault's view of its HSM: exactly the operations the protocol needs, on
// the key set resolved by hsm-policy. Async on purpose: callers must not care
// whether a call runs on this thread or in an HSM worker. One implementation,
// HsmKeys (keys.ts), on either port (port.ts); decorate.ts wraps it.
import type { AnchorState } from './anchor.js';

export type { AnchorState } from './anchor.js';

export interface VaultKeys {
  /** Public point of the channel key (65 bytes). */
  readonly channelPublic: Uint8Array;
  /** Public point of the descriptor signing key (65 bytes): what clients pin. */
  readonly signingPublic: Uint8Array;
  /** The seal epoch new records are sealed under. */
  currentEpoch(): number;
  epochs(): number[];
  /** x(k·B) with the OPRF key. `point` must already be validated. */
  oprfEvaluate(point: Uint8Array): Promise<Uint8Array>;
  /** x(kx·E): the channel's shared secret for a client's ephemeral key. */
  channelAgree(point: Uint8Array): Promise<Uint8Array>;
  makeVerifier(input: Uint8Array): Promise<Uint8Array>;
  /** Compared inside the HSM; true only on an exact match. */
  checkVerifier(input: Uint8Array, verifier: Uint8Array): Promise<boolean>;
  /** iv(12) ‖ ciphertext ‖ tag under the seal key of `epoch`. */
  seal(epoch: number, aad: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array>;
  /** `null` when the blob does not authenticate (tampered, wrong AAD or wrong epoch). */
  unseal(epoch: number, aad: Uint8Array, blob: Uint8Array): Promise<Uint8Array | null>;
  /** ECDSA P-256 over a 32-byte digest, raw r‖s. */
  sign(digest: Uint8Array): Promise<Uint8Array>;
  /** A tenant's credential secret, derived in the HSM from the tenant key (never stored). */
  tenantSecret(input: Uint8Array): Promise<Uint8Array>;
  random(n: number): Promise<Uint8Array>;
  /**
   * The state anchor as the HSM holds it (the newest slot). `foreign` is set when a slot
   * holds a label this process did not leave there since it first read the anchor.
   */
  readAnchor(): Promise<AnchorState>;
  /**
   * Move the anchor forward, under this process's writer id. Must complete before any
   * answer depending on the change leaves. Refuses (STATE_ROLLBACK_DETECTED, hsm/anchor.ts
   * isAnchorConflict) without writing when another process wrote a slot since.
   */
  writeAnchor(a: { seq: number; root: Uint8Array }): Promise<void>;
  /** Create the seal key of a new epoch (rotation). */
  addEpoch(epoch: number): Promise<void>;
  /** Destroy a seal epoch's key object: everything sealed under it is gone for good. */
  destroyEpoch(epoch: number): Promise<void>;
  /**
   * Start using a seal epoch's key that reached the token another way (the key
   * ceremony's import, a cohort rotation), after the whole key set passes the
   * policy again. HSM_POLICY_VIOLATION when the token does not hold it.
   */
  adoptEpoch(epoch: number): Promise<void>;
  /** True when the token answers a real round trip now (readiness). */
  ping(): Promise<boolean>;
  /** Ends every session (and the pool's workers); resolves when they are gone. */
  close(): Promise<void>;
}
