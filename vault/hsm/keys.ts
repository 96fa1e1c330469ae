// The one VaultKeys: every rule about the vault's HSM operations, once, on top
// of a narrow HsmPort (port.ts) that runs them on this thread (TokenPort) or on
// worker threads (HsmPool). The rules: seal framing iv(12) ‖ ciphertext ‖ tag
// and its minimum length; the seal epochs (the current one is the highest, it
// is never destroyed, a new one is made in its phase, one that reached the
// token another way is adopted only after the policy passes); the state
// anchor's A/B slots (anchor.ts AnchorBook); the public points.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { sealLabel } from '../../hsm-policy/policy.js';
import { AnchorBook, type AnchorState } from './anchor.js';
import type { HsmPort } from './port.js';
import type { VaultKeys } from './vault-keys.js';

const IV = 12;
const TAG = 16;

export class HsmKeys<P extends HsmPort = HsmPort> implements VaultKeys {
  readonly channelPublic: Uint8Array;
  readonly signingPublic: Uint8Array;
  /** Which slot is newest, what each should hold, this process's writer id (hsm/anchor.ts). */
  private readonly anchor = new AnchorBook();

  constructor(readonly port: P) {
    this.channelPublic = port.points.kx;
    this.signingPublic = port.points.sig;
  }

  /** Labels created while resolving the key set (bkv-admin init reports them). */
  get created(): string[] {
    return this.port.created;
  }

  currentEpoch(): number {
    return Math.max(...this.port.epochs());
  }

  epochs(): number[] {
    return this.port.epochs();
  }

  oprfEvaluate(point: Uint8Array): Promise<Uint8Array> {
    return this.port.call({ op: 'ecdh', key: 'oprf', point });
  }

  channelAgree(point: Uint8Array): Promise<Uint8Array> {
    return this.port.call({ op: 'ecdh', key: 'kx', point });
  }

  makeVerifier(input: Uint8Array): Promise<Uint8Array> {
    return this.port.call({ op: 'hmac', key: 'verifier', data: input });
  }

  checkVerifier(input: Uint8Array, verifier: Uint8Array): Promise<boolean> {
    return this.port.call({ op: 'verify', key: 'verifier', data: input, mac: verifier });
  }

  async seal(epoch: number, aad: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    const [iv, ct] = await this.port.call({ op: 'encrypt', key: { seal: epoch }, ivBytes: IV, aad, pt: plaintext });
    return Buffer.concat([iv, ct]);
  }

  async unseal(epoch: number, aad: Uint8Array, blob: Uint8Array): Promise<Uint8Array | null> {
    // Too short to hold an IV and a tag: it cannot authenticate, and the HSM need not be asked.
    if (blob.length < IV + TAG) return null;
    return this.port.call({ op: 'decrypt', key: { seal: epoch }, iv: blob.subarray(0, IV), aad, ct: blob.subarray(IV) });
  }

  sign(digest: Uint8Array): Promise<Uint8Array> {
    return this.port.call({ op: 'sign', key: 'sig', digest });
  }

  tenantSecret(input: Uint8Array): Promise<Uint8Array> {
    return this.port.call({ op: 'hmac', key: 'tenant', data: input });
  }

  random(n: number): Promise<Uint8Array> {
    return this.port.call({ op: 'random', n });
  }

  async readAnchor(): Promise<AnchorState> {
    // Both reads dispatched together.
    const labels = await Promise.all([this.port.call({ op: 'readLabel', key: 'anchor' }), this.port.call({ op: 'readLabel', key: 'anchorB' })]);
    return this.anchor.read(labels);
  }

  async writeAnchor(a: { seq: number; root: Uint8Array }): Promise<void> {
    const w = this.anchor.plan(a);
    let found: [string, string] | null;
    try {
      // The check and the write in one HSM call, next to one session.
      found = await this.port.call({ op: 'casAnchor', expect: w.expect, target: w.target, label: w.label });
    } catch (e) {
      this.anchor.failed(w);
      throw e;
    }
    if (found) throw this.anchor.conflict(found);
    this.anchor.wrote(w);
  }

  async addEpoch(epoch: number): Promise<void> {
    if (this.port.epochs().includes(epoch)) return;
    // In the phase of the current epoch's key: an open vault's new epoch can be cloned to its cohort.
    await this.port.call({ op: 'genSeal', epoch, like: this.currentEpoch() });
  }

  async adoptEpoch(epoch: number): Promise<void> {
    if (this.port.epochs().includes(epoch)) return;
    if (!(await this.port.call({ op: 'findSeal', epoch }))) {
      throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `the HSM holds no key ${sealLabel(epoch)} to adopt`);
    }
  }

  async destroyEpoch(epoch: number): Promise<void> {
    if (!this.port.epochs().includes(epoch)) return;
    if (epoch === this.currentEpoch()) throw new VaultError(ErrorCodes.BAD_REQUEST, 'refusing to destroy the current seal epoch');
    await this.port.call({ op: 'destroy', key: { seal: epoch } });
  }

  ping(): Promise<boolean> {
    return this.port.ping();
  }

  close(): Promise<void> {
    return this.port.close();
  }
}
