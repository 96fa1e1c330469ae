// The narrow HSM port: the primitive operations the vault's one VaultKeys
// (keys.ts) is built from, with keys named by their role, never by a handle.
// Two implementations: TokenPort (token-port.ts, on this thread) and HsmPool
// (pool/pool.ts, on worker threads). Every rule about what the operations
// mean (seal framing, epochs, the anchor book) lives in keys.ts, not here;
// a port only maps roles to the token's objects and runs the calls.
import type { AnchorExpectation } from './anchor.js';

/** A key (or the anchor's data objects) by what it is for. */
export type KeyRole = 'kx' | 'sig' | 'oprf' | 'verifier' | 'tenant' | 'anchor' | 'anchorB' | { seal: number };

export type HsmOp =
  /** x(k·P) with an EC private key. */
  | { op: 'ecdh'; key: 'kx' | 'oprf'; point: Uint8Array }
  | { op: 'hmac'; key: 'verifier' | 'tenant'; data: Uint8Array }
  /** HMAC compared inside the HSM. */
  | { op: 'verify'; key: 'verifier'; data: Uint8Array; mac: Uint8Array }
  /** AES-GCM under a fresh IV of `ivBytes` from the HSM's RNG: answers [iv, ciphertext ‖ tag]. */
  | { op: 'encrypt'; key: { seal: number }; ivBytes: number; aad: Uint8Array; pt: Uint8Array }
  /** null when the tag does not verify. */
  | { op: 'decrypt'; key: { seal: number }; iv: Uint8Array; aad: Uint8Array; ct: Uint8Array }
  | { op: 'sign'; key: 'sig'; digest: Uint8Array }
  | { op: 'random'; n: number }
  | { op: 'readLabel'; key: 'anchor' | 'anchorB' }
  /** Write `label` to anchor slot `target` only if both slots hold what `expect` allows (anchor.ts casAnchor): null, or the labels found. */
  | { op: 'casAnchor'; expect: AnchorExpectation; target: 0 | 1; label: string }
  /** Create the seal key of `epoch`, in the phase of the key of epoch `like`. */
  | { op: 'genSeal'; epoch: number; like: number }
  /** Find a seal key that reached the token another way, after the whole key set passes the policy again: false when absent. */
  | { op: 'findSeal'; epoch: number }
  | { op: 'destroy'; key: { seal: number } };

export interface OpResults {
  ecdh: Uint8Array;
  hmac: Uint8Array;
  verify: boolean;
  encrypt: [iv: Uint8Array, ct: Uint8Array];
  decrypt: Uint8Array | null;
  sign: Uint8Array;
  random: Uint8Array;
  readLabel: string;
  casAnchor: [string, string] | null;
  genSeal: void;
  findSeal: boolean;
  destroy: void;
}

export type ResultOf<O extends HsmOp> = OpResults[O['op']];

export interface HsmPort {
  /** Public points of the channel and descriptor signing keys, as resolved at open. */
  readonly points: { kx: Uint8Array; sig: Uint8Array };
  /** Labels created while resolving the key set (bkv-admin init reports them). */
  readonly created: string[];
  /** The seal epochs the token holds a key for, as this port knows them. */
  epochs(): number[];
  /** Run one operation. An unknown seal epoch fails RECORD_CORRUPT (its key was destroyed). */
  call<O extends HsmOp>(op: O): Promise<ResultOf<O>>;
  /** A real round trip to the token, answered within a short time. */
  ping(): Promise<boolean>;
  /** Ends the sessions (and workers); resolves when they are gone. */
  close(): Promise<void>;
}
