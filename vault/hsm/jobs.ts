// From a port operation to PKCS#11 calls, for both ports (TokenPort on this
// thread, the pool's worker script): KeyTable binds an operation's key roles
// to the token's object handles (and keeps that map as seal keys are made,
// found, destroyed, or the whole set is resolved again), runJob() runs a bound
// job on a Token, and KeyTable.settle() turns its raw answer into the port's
// result. No rule about what the operations mean lives here (keys.ts).
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { sealLabel } from '../../hsm-policy/policy.js';
import { enforcePolicy, epochProtection } from '../../hsm-policy/enforce.js';
import type { Handle, Token } from './token.js';
import { casAnchor, type AnchorExpectation } from './anchor.js';
import type { HsmOp, KeyRole, ResultOf } from './port.js';

/** The resolved key set as handles (hsm-policy enforcePolicy's answer has this shape). */
export interface KeySet {
  kx: { priv: Uint8Array; point: Uint8Array };
  sig: { priv: Uint8Array; point: Uint8Array };
  oprf: { priv: Uint8Array; point: Uint8Array };
  verifier: Uint8Array;
  tenant: Uint8Array;
  /** The two state anchor slots (hsm-policy ANCHOR), written alternately. */
  anchors: readonly [Uint8Array, Uint8Array];
  /** Seal keys by epoch; the highest is current. */
  seals: ReadonlyMap<number, Uint8Array>;
}

/** An operation with its keys bound to handles: what runs on a Token (and crosses to a worker). */
export type Job =
  | { op: 'ecdh'; key: Uint8Array; point: Uint8Array }
  | { op: 'hmac'; key: Uint8Array; data: Uint8Array }
  | { op: 'verify'; key: Uint8Array; data: Uint8Array; mac: Uint8Array }
  | { op: 'encrypt'; key: Uint8Array; ivBytes: number; aad: Uint8Array; pt: Uint8Array }
  | { op: 'decrypt'; key: Uint8Array; iv: Uint8Array; aad: Uint8Array; ct: Uint8Array }
  | { op: 'sign'; key: Uint8Array; digest: Uint8Array }
  | { op: 'random'; n: number }
  | { op: 'readLabel'; key: Uint8Array }
  | { op: 'casAnchor'; slots: [Uint8Array, Uint8Array]; expect: AnchorExpectation; target: 0 | 1; label: string }
  /** A new seal key labelled `label`, in the phase of `key`. */
  | { op: 'genSeal'; label: string; key: Uint8Array }
  | { op: 'findSeal'; epoch: number }
  | { op: 'destroy'; key: Uint8Array }
  | { op: 'ping' };

export type JobValue = Uint8Array | boolean | string | null | Uint8Array[] | string[];

// pkcs11js wants Buffers; a structured clone (or tight()) hands over plain Uint8Arrays.
const h = (u: Uint8Array): Handle => Buffer.from(u.buffer, u.byteOffset, u.byteLength) as Handle;

/** One bound job, synchronously, on `token`'s sessions. */
export function runJob(token: Token, j: Job): JobValue {
  switch (j.op) {
    case 'ecdh':
      return token.ecdhX(h(j.key), j.point);
    case 'hmac':
      return token.hmacSha256(h(j.key), j.data);
    case 'verify':
      return token.hmacSha256Verify(h(j.key), j.data, j.mac);
    case 'encrypt': {
      const iv = token.random(j.ivBytes);
      return [iv, token.aesGcmEncrypt(h(j.key), iv, j.aad, j.pt)];
    }
    case 'decrypt':
      return token.aesGcmDecrypt(h(j.key), j.iv, j.aad, j.ct);
    case 'sign':
      return token.ecdsaSign(h(j.key), j.digest);
    case 'random':
      return token.random(j.n);
    case 'readLabel':
      return token.readLabel(h(j.key));
    case 'casAnchor':
      return casAnchor(token, [h(j.slots[0]), h(j.slots[1])], j.expect, j.target, j.label) ?? null;
    case 'genSeal':
      return token.generateSecretKey(j.label, 'aes', 32, ['encrypt', 'decrypt'], epochProtection(token, h(j.key)));
    case 'destroy':
      token.destroy(h(j.key));
      return null;
    case 'findSeal':
      return enforcePolicy(token, { create: false }).seals.get(j.epoch) ?? null;
    case 'ping':
      return token.ping();
  }
}

/**
 * A Uint8Array that owns exactly its bytes. postMessage clones a view's whole
 * ArrayBuffer, and small Buffers are views into Node's shared 8 KiB pool: a
 * 32-byte argument would otherwise cost an 8 KiB copy each way.
 */
export function tight(u: Uint8Array): Uint8Array {
  return u.byteOffset === 0 && u.byteLength === u.buffer.byteLength ? u : new Uint8Array(u);
}

/** `v` with every byte array in it tight (what a worker sends back). */
export function tightValue(v: JobValue): JobValue {
  if (v instanceof Uint8Array) return tight(v);
  if (Array.isArray(v) && v[0] instanceof Uint8Array) return (v as Uint8Array[]).map(tight);
  return v;
}

function noBytes(): VaultError {
  return new VaultError(ErrorCodes.HSM_ERROR, 'the HSM returned no bytes');
}

/** Roles to handles for one resolved key set. */
export class KeyTable {
  private keys: {
    kx: Uint8Array;
    sig: Uint8Array;
    oprf: Uint8Array;
    verifier: Uint8Array;
    tenant: Uint8Array;
    anchor: Uint8Array;
    anchorB: Uint8Array;
    seals: Map<number, Uint8Array>;
  };
  readonly points: { kx: Uint8Array; sig: Uint8Array; oprf: Uint8Array };

  constructor(k: KeySet) {
    this.points = { kx: new Uint8Array(k.kx.point), sig: new Uint8Array(k.sig.point), oprf: new Uint8Array(k.oprf.point) };
    this.keys = KeyTable.handles(k);
  }

  private static handles(k: KeySet): KeyTable['keys'] {
    return {
      kx: tight(k.kx.priv),
      sig: tight(k.sig.priv),
      oprf: tight(k.oprf.priv),
      verifier: tight(k.verifier),
      tenant: tight(k.tenant),
      anchor: tight(k.anchors[0]),
      anchorB: tight(k.anchors[1]),
      seals: new Map([...k.seals].map(([e, hd]) => [e, tight(hd)])),
    };
  }

  /**
   * The same keys found again by label (after a lost login or a library recycle: handles may change).
   * Same labels must mean the same keys: a swapped token is not something to carry on with.
   */
  replace(k: KeySet): void {
    const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));
    if (!same(k.kx.point, this.points.kx) || !same(k.sig.point, this.points.sig) || !same(k.oprf.point, this.points.oprf)) {
      throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, 'the HSM key set changed while the vault was running');
    }
    this.keys = KeyTable.handles(k);
  }

  epochs(): number[] {
    return [...this.keys.seals.keys()].sort((a, b) => a - b);
  }

  private handle(role: KeyRole): Uint8Array {
    if (typeof role === 'string') return this.keys[role];
    const hd = this.keys.seals.get(role.seal);
    // The epoch's key was destroyed by a rotation: whatever was sealed under it is gone for good.
    if (!hd) throw new VaultError(ErrorCodes.RECORD_CORRUPT, `seal epoch ${role.seal} no longer exists on the HSM`);
    return hd;
  }

  /** The job for `op` on the handles as of now (after any re-resolve). */
  bind(op: HsmOp): Job {
    switch (op.op) {
      case 'casAnchor':
        return { ...op, slots: [this.keys.anchor, this.keys.anchorB] };
      case 'genSeal':
        return { op: 'genSeal', label: sealLabel(op.epoch), key: this.handle({ seal: op.like }) };
      case 'findSeal':
      case 'random':
        return op;
      default:
        return { ...op, key: this.handle(op.key) } as Job;
    }
  }

  /** The port's answer for `op` from the job's raw value; seal keys made, found or destroyed enter or leave the table. */
  settle<O extends HsmOp>(op: O, v: JobValue): ResultOf<O> {
    return this.result(op, v) as ResultOf<O>;
  }

  private result(op: HsmOp, v: JobValue): unknown {
    switch (op.op) {
      case 'genSeal':
        if (!(v instanceof Uint8Array)) throw noBytes();
        this.keys.seals.set(op.epoch, tight(v));
        return undefined;
      case 'findSeal':
        if (!(v instanceof Uint8Array)) return false;
        this.keys.seals.set(op.epoch, tight(v));
        return true;
      case 'destroy':
        this.keys.seals.delete(op.key.seal);
        return undefined;
      case 'verify':
        return v === true;
      case 'decrypt':
        return v instanceof Uint8Array ? v : null;
      case 'readLabel':
        return typeof v === 'string' ? v : '';
      case 'casAnchor':
        return Array.isArray(v) ? v : null;
      case 'encrypt':
        if (!Array.isArray(v) || !(v[0] instanceof Uint8Array) || !(v[1] instanceof Uint8Array)) throw noBytes();
        return v;
      default:
        if (!(v instanceof Uint8Array)) throw noBytes();
        return v;
    }
  }
}
