// The vault's view of its HSM: exactly the operations the protocol needs, on
// the key set resolved by hsm-policy. Async on purpose: callers must not care
// whether a call runs on this thread or in an HSM worker.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { sealLabel } from '../../hsm-policy/policy.js';
import { enforcePolicy, epochProtection } from '../../hsm-policy/enforce.js';
import type { Handle, Token } from './token.js';
import { AnchorBook, casAnchor, type AnchorState } from './anchor.js';

export type { AnchorState } from './anchor.js';

export interface HsmKeyHandles {
  kx: { priv: Handle; point: Uint8Array };
  sig: { priv: Handle; point: Uint8Array };
  oprf: { priv: Handle };
  verifier: Handle;
  tenant: Handle;
  anchors: [Handle, Handle];
  seals: Map<number, Handle>;
}

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

const IV = 12;

export class TokenVaultKeys implements VaultKeys {
  readonly channelPublic: Uint8Array;
  readonly signingPublic: Uint8Array;

  constructor(
    private readonly token: Token,
    private keys: HsmKeyHandles,
    /** Labels created while resolving the key set (bkv-admin init reports them). */
    readonly created: string[] = [],
    /**
     * Finds the key set again by label (hsm-policy, without creating anything). Used
     * when the login was lost under us: SoftHSM then invalidates every private-object
     * handle, and without this the vault would answer HSM_ERROR until restarted.
     */
    private readonly resolve?: () => HsmKeyHandles,
  ) {
    this.channelPublic = keys.kx.point;
    this.signingPublic = keys.sig.point;
  }

  /**
   * Run one HSM call on handles known to be current. If the token saw a stale handle
   * (login lost: every session closed, C_Logout, a token reset), find the keys again
   * and retry once; until the token is back this fails with HSM_UNAVAILABLE, and the
   * first call after it returns succeeds (test/adversarial-hsm.test.ts).
   */
  private async fresh<T>(fn: () => T): Promise<T> {
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
    const k = this.resolve();
    // Same labels must mean the same keys: a swapped token is not something to carry on with.
    if (!Buffer.from(k.kx.point).equals(Buffer.from(this.channelPublic)) || !Buffer.from(k.sig.point).equals(Buffer.from(this.signingPublic))) {
      throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, 'the HSM key set changed while the vault was running');
    }
    this.keys = k;
    this.token.handlesLost = false;
  }

  currentEpoch(): number {
    return Math.max(...this.keys.seals.keys());
  }

  epochs(): number[] {
    return [...this.keys.seals.keys()].sort((a, b) => a - b);
  }

  async oprfEvaluate(point: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => this.token.ecdhX(this.keys.oprf.priv, point));
  }

  async channelAgree(point: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => this.token.ecdhX(this.keys.kx.priv, point));
  }

  async makeVerifier(input: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => this.token.hmacSha256(this.keys.verifier, input));
  }

  async checkVerifier(input: Uint8Array, verifier: Uint8Array): Promise<boolean> {
    return this.fresh(() => this.token.hmacSha256Verify(this.keys.verifier, input, verifier));
  }

  async seal(epoch: number, aad: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => {
      const key = this.sealKey(epoch);
      const iv = this.token.random(IV);
      const ct = this.token.aesGcmEncrypt(key, iv, aad, plaintext);
      return Buffer.concat([iv, ct]);
    });
  }

  async unseal(epoch: number, aad: Uint8Array, blob: Uint8Array): Promise<Uint8Array | null> {
    if (blob.length < IV + 16) return null;
    return this.fresh(() => this.token.aesGcmDecrypt(this.sealKey(epoch), blob.subarray(0, IV), aad, blob.subarray(IV)));
  }

  async sign(digest: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => this.token.ecdsaSign(this.keys.sig.priv, digest));
  }

  async tenantSecret(input: Uint8Array): Promise<Uint8Array> {
    return this.fresh(() => this.token.hmacSha256(this.keys.tenant, input));
  }

  async random(n: number): Promise<Uint8Array> {
    return this.token.random(n);
  }

  /** Which slot is newest, what each should hold, this process's writer id (hsm/anchor.ts). */
  private readonly anchor = new AnchorBook();

  async readAnchor(): Promise<AnchorState> {
    // Handles are looked up inside: fresh() may find the keys again after a lost login.
    return this.anchor.read(await this.fresh(() => [this.token.readLabel(this.keys.anchors[0]), this.token.readLabel(this.keys.anchors[1])] as [string, string]));
  }

  async writeAnchor(a: { seq: number; root: Uint8Array }): Promise<void> {
    const w = this.anchor.plan(a);
    let found: [string, string] | undefined;
    try {
      found = await this.fresh(() => casAnchor(this.token, this.keys.anchors, w.expect, w.target, w.label));
    } catch (e) {
      this.anchor.failed(w);
      throw e;
    }
    if (found) throw this.anchor.conflict(found);
    this.anchor.wrote(w);
  }

  async addEpoch(epoch: number): Promise<void> {
    if (this.keys.seals.has(epoch)) return;
    // In the phase of the current epoch's key: an open vault's new epoch can be cloned to its cohort.
    const h = await this.fresh(() =>
      this.token.generateSecretKey(sealLabel(epoch), 'aes', 32, ['encrypt', 'decrypt'], epochProtection(this.token, this.sealKey(this.currentEpoch()))),
    );
    this.keys.seals.set(epoch, h);
  }

  async adoptEpoch(epoch: number): Promise<void> {
    if (this.keys.seals.has(epoch)) return;
    const h = await this.fresh(() => enforcePolicy(this.token, { create: false }).seals.get(epoch));
    if (!h) throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `the HSM holds no key ${sealLabel(epoch)} to adopt`);
    this.keys.seals.set(epoch, h);
  }

  async destroyEpoch(epoch: number): Promise<void> {
    const h = this.keys.seals.get(epoch);
    if (!h) return;
    if (epoch === this.currentEpoch()) throw new VaultError(ErrorCodes.BAD_REQUEST, 'refusing to destroy the current seal epoch');
    this.token.destroy(h);
    this.keys.seals.delete(epoch);
  }

  async ping(): Promise<boolean> {
    return this.token.ping();
  }

  async close(): Promise<void> {
    this.token.close();
  }

  private sealKey(epoch: number): Handle {
    const h = this.keys.seals.get(epoch);
    // The epoch's key was destroyed by a rotation: whatever was sealed under it is gone for good.
    if (!h) throw new VaultError(ErrorCodes.RECORD_CORRUPT, `seal epoch ${epoch} no longer exists on the HSM`);
    return h;
  }
}
