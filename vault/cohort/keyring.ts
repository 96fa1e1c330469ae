// The cohort's seal epochs (docs/COHORT.md, "Rotation across the cohort").
//
// Every node's HSM must hold the seal key of the epoch records are sealed
// under, and a rotation must destroy the old epoch's key on every node. The key
// itself travels only as the key ceremony carries it (vault/ceremony/): the
// rotating node makes the new epoch key in its HSM and wraps it for each
// node's ceremony target, a public key that node's Security Officer's peer
// marked trusted; only that node's HSM can unwrap it. etcd carries the wrapped
// bundles and the rotation's progress in one value, the *keyring*, changed by
// CAS like a record:
//
//   import   every node imports the new key (a node that does not answer
//            within the wait is *fenced*: it must import before it serves)
//   reseal   the rotating node re-seals every live record under the new epoch;
//            from here every node seals new records under it
//   destroy  every node destroys the older epoch keys (C_DestroyObject) and
//            says so; a fenced node does it at its next start, before serving
//
// A node that was down through a rotation finds, at start, a current epoch it
// does not hold: it imports the bundle kept for its target and destroys the
// retired epochs before it serves; with no bundle for it, it refuses to start.
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { VaultKeys } from '../hsm/vault-keys.js';
import type { CohortLedger } from './ledger.js';
import type { Replica } from './replica.js';
import { decodeEnvelope } from './envelope.js';

/** What a node needs of the key ceremony (vault/ceremony/steps.ts), on its own HSM. */
export interface CeremonyPort {
  /** This HSM's ceremony target (its unwrap key): fingerprint and the target file's text; undefined if it has none. */
  target(): { fingerprint: string; text: string } | undefined;
  /** The seal key of `epoch`, wrapped for the target in `targetText` (trusted on this HSM). */
  exportEpoch(targetText: string, epoch: number): string;
  /** Unwrap a seal-epoch bundle made for this HSM, and prove it (known answers). */
  importEpoch(bundleText: string): void;
}

export interface Member {
  /** Fingerprint of the node's ceremony target; null: it has none, so no rotation can reach it. */
  target: string | null;
  targetText: string | null;
  joinedAt: number;
}

export interface Rotation {
  target: number;
  /** The node running it. */
  from: string;
  phase: 'import' | 'reseal' | 'destroy';
  imported: string[];
  destroyed: string[];
  /** Did not import within the wait: they import (and destroy) at their next start, before serving. */
  fenced: string[];
  startedAt: number;
}

export interface KeyringState {
  v: 1;
  kind: 'keyring';
  members: Record<string, Member>;
  /** The epoch records are sealed under, cohort-wide. */
  current: number;
  /** Every epoch up to this one must be destroyed on every node. */
  retired: number;
  /** The newest epoch's key, wrapped for each member's target (kept for members that were down). */
  bundles: { epoch: number; byTarget: Record<string, string> } | null;
  rotation: Rotation | null;
  /** The last finished rotation: where the old keys are destroyed, and which nodes still owe it. */
  last: { epoch: number; destroyedOn: string[]; pending: string[]; at: number } | null;
}

/** The keyring's id in the engine: a hash no record key produces (core/record-log.ts hashes with another prefix). */
export const KEYRING_ID = createHash('sha256').update('bkv-cohort-keyring-v1').digest('hex');

const enc = (k: KeyringState) => new Uint8Array(Buffer.from(JSON.stringify(k), 'utf8'));

export function decodeKeyring(raw: Uint8Array | undefined): KeyringState | undefined {
  if (!raw) return undefined;
  let k: KeyringState;
  try {
    k = JSON.parse(Buffer.from(raw).toString('utf8')) as KeyringState;
  } catch {
    throw corrupt();
  }
  if (k?.v !== 1 || k.kind !== 'keyring' || typeof k.members !== 'object' || !Number.isInteger(k.current) || !Number.isInteger(k.retired)) throw corrupt();
  return k;
}

function corrupt(): VaultError {
  return new VaultError(ErrorCodes.RECORD_CORRUPT, 'cohort: the keyring value in etcd is not a keyring of this vault');
}

const add = (list: string[], id: string) => (list.includes(id) ? list : [...list, id].sort());

export interface RotateOptions {
  resume?: boolean;
  /** How long to wait for every member to import (then the rest are fenced), and to destroy. */
  waitMs?: number;
  /** Re-seal every live record under `target`; resolves when none is left under an older epoch. */
  reseal: (target: number) => Promise<{ resealed: number; unreadable: number }>;
}

export interface CohortRotationResult {
  epoch: number;
  resealed: number;
  unreadable: number;
  destroyedEpochs: number[];
  /** Nodes whose HSM destroyed the older epoch keys before this returned. */
  destroyedOn: string[];
  /** Nodes that did not (down): each imports the new epoch and destroys the old at its next start, before serving. */
  pendingNodes: string[];
}

export class CohortKeyring {
  private timer: NodeJS.Timeout | undefined;
  private syncing: Promise<void> | undefined;
  private lastRevision = -1n;
  private closed = false;

  constructor(
    private readonly o: {
      ledger: CohortLedger;
      replica: Replica;
      nodeId: string;
      keys: VaultKeys;
      ceremony: CeremonyPort;
      log: Logger;
      pollMs?: number;
      now?: () => number;
    },
  ) {}

  private now(): number {
    return this.o.now?.() ?? Date.now();
  }

  /** The last value peek() decoded, by its mod_revision: sealingEpoch() runs on every enrolment and descriptor. */
  private peeked: { revision: bigint; state: KeyringState | undefined } | undefined;

  /** The keyring as this node's replica holds it (possibly a little behind). */
  peek(): KeyringState | undefined {
    const e = this.o.replica.get(this.o.ledger.recordKey(KEYRING_ID));
    if (!e) return undefined;
    if (this.peeked?.revision === e.modRevision) return this.peeked.state;
    const env = decodeEnvelope(e.value);
    if (!env) throw corrupt();
    const state = decodeKeyring(env.payload);
    this.peeked = { revision: e.modRevision, state };
    return state;
  }

  async read(): Promise<KeyringState | undefined> {
    return decodeKeyring((await this.o.ledger.read(KEYRING_ID)).value);
  }

  /** The epoch new records are sealed under: the cohort's, once every reachable node holds it. */
  sealingEpoch(): number {
    const k = this.peek();
    if (!k) return this.o.keys.currentEpoch();
    return k.rotation && k.rotation.phase !== 'import' ? k.rotation.target : k.current;
  }

  private async change(f: (k: KeyringState | undefined) => KeyringState | undefined): Promise<KeyringState | undefined> {
    let out: KeyringState | undefined;
    const r = await this.o.ledger.commit(KEYRING_ID, (cur) => {
      const before = decodeKeyring(cur);
      out = f(before);
      return out ? enc(out) : undefined;
    });
    await this.o.ledger.waitApplied(r.revision);
    return out ?? this.peek();
  }

  /**
   * At start, before serving: say who this node is (its ceremony target), then
   * hold the cohort's current epoch and none it retired. Throws when it cannot.
   */
  async join(): Promise<void> {
    const t = this.o.ceremony.target();
    const me = this.o.nodeId;
    await this.change((k) => {
      const member: Member = { target: t?.fingerprint ?? null, targetText: t?.text ?? null, joinedAt: k?.members[me]?.joinedAt ?? this.now() };
      if (k && k.members[me]?.target === member.target && k.members[me]?.targetText === member.targetText) return undefined;
      const base: KeyringState = k ?? { v: 1, kind: 'keyring', members: {}, current: this.o.keys.currentEpoch(), retired: 0, bundles: null, rotation: null, last: null };
      return { ...base, members: { ...base.members, [me]: member } };
    });
    await this.sync(await this.read());
  }

  /**
   * Why this node cannot serve the cohort's records right now, if it cannot: it does
   * not hold the epoch records are (or are being re-)sealed under, e.g. it was fenced
   * and has no bundle it can open. Readiness fails with this (cohort/node.ts).
   */
  health(): string | undefined {
    const k = this.peek();
    if (!k) return undefined;
    const need = this.sealingEpoch();
    if (this.o.keys.epochs().includes(need)) return undefined;
    return `cohort: this node's HSM does not hold seal epoch ${need}, which the cohort seals under${this.lastError ? ` (${this.lastError})` : ''}`;
  }

  private lastError: string | undefined;

  /** Follow the keyring while serving: import, destroy and acknowledge as it moves. */
  start(): void {
    this.timer = setInterval(() => {
      const e = this.o.replica.get(this.o.ledger.recordKey(KEYRING_ID));
      if (!e || e.modRevision === this.lastRevision || this.syncing) return;
      this.lastRevision = e.modRevision;
      this.syncing = this.sync(this.peek())
        .then(() => (this.lastError = undefined))
        .catch((err: unknown) => {
          this.lastRevision = -1n; // try again at the next tick
          const message = (err as Error).message;
          // Logged once per distinct failure, not at every retry.
          if (message !== this.lastError) this.o.log.error({ event: 'cohort.keyring.failed', err: message }, 'cohort keyring: could not follow a rotation');
          this.lastError = message;
        })
        .finally(() => (this.syncing = undefined));
    }, this.o.pollMs ?? 200);
    this.timer.unref();
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
  }

  /** Bring this node's HSM in line with `k`, and record what it did. */
  async sync(k: KeyringState | undefined): Promise<void> {
    if (!k || this.closed) return;
    const me = this.o.nodeId;
    const keys = this.o.keys;
    const r = k.rotation;
    const wanted = r ? r.target : k.current;
    if (!keys.epochs().includes(wanted)) await this.acquire(k, wanted);
    if (r && r.phase === 'import' && !r.imported.includes(me)) {
      await this.change((cur) => (cur?.rotation?.target === r.target && !cur.rotation.imported.includes(me) ? { ...cur, rotation: { ...cur.rotation, imported: add(cur.rotation.imported, me) } } : undefined));
    }
    // Destroy what the cohort retired, or (in a rotation's destroy phase) everything older than its target.
    const below = r?.phase === 'destroy' ? r.target : k.retired + 1;
    const doomed = keys.epochs().filter((e) => e < below && e !== wanted);
    for (const e of doomed) await keys.destroyEpoch(e);
    if (doomed.length) this.o.log.warn({ event: 'cohort.keyring.destroyed', node: me, epochs: doomed }, 'cohort: older seal epoch keys destroyed in this HSM');
    const owes = r ? r.phase === 'destroy' && !r.destroyed.includes(me) : !!k.last?.pending.includes(me);
    if (owes && keys.epochs().every((e) => e >= below)) {
      await this.change((cur) => {
        if (!cur) return undefined;
        if (cur.rotation?.phase === 'destroy' && !cur.rotation.destroyed.includes(me)) {
          return { ...cur, rotation: { ...cur.rotation, destroyed: add(cur.rotation.destroyed, me) } };
        }
        if (!cur.rotation && cur.last?.pending.includes(me)) {
          return { ...cur, last: { ...cur.last, pending: cur.last.pending.filter((n) => n !== me), destroyedOn: add(cur.last.destroyedOn, me) } };
        }
        return undefined;
      });
    }
  }

  /** Import `epoch`'s key from the bundle made for this node's target, and start using it. */
  private async acquire(k: KeyringState, epoch: number): Promise<void> {
    if (epoch < Math.max(...this.o.keys.epochs())) {
      throw new VaultError(ErrorCodes.STATE_ROLLBACK_DETECTED, `cohort: the keyring names seal epoch ${epoch}, older than this HSM's ${Math.max(...this.o.keys.epochs())}`);
    }
    const t = this.o.ceremony.target();
    const bundle = t && k.bundles?.epoch === epoch ? k.bundles.byTarget[t.fingerprint] : undefined;
    if (!bundle) {
      throw new VaultError(
        ErrorCodes.HSM_POLICY_VIOLATION,
        `cohort: records are sealed under epoch ${epoch}, which this HSM does not hold, and no bundle in etcd is made for this node's ceremony target ` +
          `(${t ? t.fingerprint.slice(0, 16) : 'none: run "bkv-admin ceremony target-init"'}); clone the epoch with "bkv-admin ceremony export --epoch ${epoch}" / "import"`,
      );
    }
    this.o.ceremony.importEpoch(bundle);
    await this.o.keys.adoptEpoch(epoch);
    this.o.log.info({ event: 'cohort.keyring.imported', node: this.o.nodeId, epoch }, 'cohort: seal epoch imported into this HSM');
  }

  /** Lazily adopt an epoch another node sealed a record under (imported here during the rotation's import phase). */
  async ensure(epoch: number): Promise<void> {
    if (this.o.keys.epochs().includes(epoch)) return;
    const k = this.peek();
    if (!k || (k.current !== epoch && k.rotation?.target !== epoch)) return;
    await this.o.keys.adoptEpoch(epoch).catch(() => this.sync(k));
  }

  /** Rotate the cohort's seal epoch from this node (bkv-admin rotate through its daemon). */
  async rotate(o: RotateOptions): Promise<CohortRotationResult> {
    const me = this.o.nodeId;
    const waitMs = o.waitMs ?? 30_000;
    let k = await this.read();
    if (!k) throw new VaultError(ErrorCodes.INTERNAL, 'cohort: no keyring yet (this node has not joined)');
    let r = k.rotation;
    if (r && !o.resume) {
      throw new VaultError(
        ErrorCodes.BAD_REQUEST,
        `a rotation to seal epoch ${r.target} is already under way (started by ${r.from}, phase ${r.phase}); finish it with "bkv-admin rotate --resume"`,
      );
    }
    if (!r) {
      if (o.resume) {
        return { epoch: k.current, resealed: 0, unreadable: 0, destroyedEpochs: [], destroyedOn: k.last?.destroyedOn ?? [], pendingNodes: k.last?.pending ?? [] };
      }
      const target = Math.max(k.current, ...this.o.keys.epochs()) + 1;
      // Every member needs a bundle it can open: refuse before anything is made.
      const none = Object.entries(k.members).filter(([id, m]) => id !== me && !m.targetText).map(([id]) => id);
      if (none.length) {
        throw new VaultError(
          ErrorCodes.BAD_REQUEST,
          `cannot rotate: node(s) ${none.join(', ')} have no ceremony target, so no new epoch key could reach them; run "bkv-admin ceremony target-init" there and "ceremony trust" here`,
        );
      }
      await this.o.keys.addEpoch(target);
      const byTarget: Record<string, string> = {};
      try {
        for (const m of Object.values(k.members)) {
          if (m.target && m.targetText && !byTarget[m.target]) byTarget[m.target] = this.o.ceremony.exportEpoch(m.targetText, target);
        }
      } catch (e) {
        await this.o.keys.destroyEpoch(target).catch(() => undefined);
        throw e;
      }
      k = await this.change((cur) => {
        if (!cur || cur.rotation) throw new VaultError(ErrorCodes.BAD_REQUEST, 'another rotation started meanwhile; nothing was changed here');
        return { ...cur, bundles: { epoch: target, byTarget }, rotation: { target, from: me, phase: 'import', imported: [me], destroyed: [], fenced: [], startedAt: this.now() } };
      });
      r = k!.rotation!;
      this.o.log.info({ event: 'rotate.start', epoch: target, cohort: true, members: Object.keys(k!.members) }, 'cohort seal-epoch rotation started');
    }
    const target = r.target;
    if (!this.o.keys.epochs().includes(target)) await this.acquire(k!, target);
    if (r.phase === 'import') {
      const members = Object.keys(k!.members);
      const s = await this.waitFor((x) => members.every((m) => x.rotation!.imported.includes(m)), waitMs);
      const fenced = members.filter((m) => !s.rotation!.imported.includes(m));
      k = await this.change((cur) => (cur?.rotation?.phase === 'import' ? { ...cur, rotation: { ...cur.rotation, phase: 'reseal', fenced } } : undefined));
      if (fenced.length) this.o.log.warn({ event: 'rotate.fenced', epoch: target, nodes: fenced }, 'nodes did not import the new epoch in time: they import it at their next start, before serving');
    }
    let resealed = 0;
    let unreadable = 0;
    if (k!.rotation!.phase === 'reseal') {
      ({ resealed, unreadable } = await o.reseal(target));
      k = await this.change((cur) => (cur?.rotation?.phase === 'reseal' ? { ...cur, rotation: { ...cur.rotation, phase: 'destroy' } } : undefined));
    }
    const destroyedEpochs = this.o.keys.epochs().filter((e) => e < target);
    await this.sync(k);
    const expect = Object.keys(k!.members).filter((m) => !k!.rotation!.fenced.includes(m));
    const s = await this.waitFor((x) => expect.every((m) => x.rotation!.destroyed.includes(m)), waitMs);
    const destroyedOn = [...s.rotation!.destroyed];
    const pendingNodes = Object.keys(s.members).filter((m) => !destroyedOn.includes(m)).sort();
    await this.change((cur) =>
      cur?.rotation?.target === target
        ? { ...cur, current: target, retired: target - 1, rotation: null, last: { epoch: target, destroyedOn: [...cur.rotation.destroyed], pending: Object.keys(cur.members).filter((m) => !cur.rotation!.destroyed.includes(m)).sort(), at: this.now() } }
        : undefined,
    );
    this.o.log.info({ event: 'rotate.done', epoch: target, resealed, unreadable, destroyedEpochs, destroyedOn, pendingNodes, cohort: true }, 'cohort seal-epoch rotation finished');
    return { epoch: target, resealed, unreadable, destroyedEpochs, destroyedOn, pendingNodes };
  }

  private async waitFor(done: (k: KeyringState) => boolean, ms: number): Promise<KeyringState> {
    const deadline = Date.now() + ms;
    for (;;) {
      const k = (await this.read())!;
      if (done(k) || Date.now() >= deadline) return k;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
