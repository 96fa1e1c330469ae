// The state anchor's two slots (hsm-policy ANCHOR) and the rules for reading
// and writing them, in one place: the one VaultKeys (keys.ts) keeps the book,
// and either port runs casAnchor() next to its session (jobs.ts runJob).
//
// One writer per anchor. Every label this process writes carries its writer
// id (random, per start). The book remembers what each slot held when the
// process first read the anchor and what it wrote there since; a write first
// checks that both slots still hold exactly that (compare-and-set), so a slot
// moved by anyone else (another daemon on the same token, on another host, or
// a bkv-admin that got past the data-folder lock) is found at this process's
// next write, which is then refused instead of made, and the ledger stops
// serving (core/ledger.ts). PKCS#11 has no atomic compare-and-swap, so two
// writers racing within one check-and-write can both pass once; the next write
// of either finds the other's label. Readiness checks the slots the same way.
import { randomBytes } from 'node:crypto';
import { VaultError, ErrorCodes, isVaultError } from '../../protocol/errors.js';
import { anchorLabel, parseAnchorLabel } from '../core/state-hash.js';

export interface AnchorState {
  seq: number;
  root: Uint8Array;
  /** Who wrote the newest slot; absent on labels from before writer ids. */
  writer?: string;
  /** Set when a slot holds a label this process did not leave there: the writer ids found ("-" for none). */
  foreign?: string[];
}

/** What one slot may hold: the labels known to be there, or (after a write whose outcome is unknown) one of ours in a seq range. */
export interface SlotExpectation {
  labels: string[];
  own?: { writer: string; lo: number; hi: number };
}

export type AnchorExpectation = [SlotExpectation, SlotExpectation];

export function slotMatches(label: string, e: SlotExpectation): boolean {
  if (e.labels.includes(label)) return true;
  if (!e.own) return false;
  const p = parseAnchorLabel(label);
  return !!p && p.writer === e.own.writer && p.seq >= e.own.lo && p.seq <= e.own.hi;
}

export interface LabelIo<H> {
  readLabel(h: H): string;
  setLabel(h: H, label: string): void;
}

/**
 * Write `label` to slot `target` only if both slots hold what `expect` allows.
 * Returns the labels found when they do not, having written nothing.
 */
export function casAnchor<H>(io: LabelIo<H>, slots: readonly [H, H], expect: AnchorExpectation, target: 0 | 1, label: string): [string, string] | undefined {
  const found: [string, string] = [io.readLabel(slots[0]), io.readLabel(slots[1])];
  if (!slotMatches(found[0], expect[0]) || !slotMatches(found[1], expect[1])) return found;
  io.setLabel(slots[target], label);
  return undefined;
}

export interface AnchorWrite {
  target: 0 | 1;
  seq: number;
  label: string;
  expect: AnchorExpectation;
}

/** The writer id a label names; "-" for a label from before writer ids (or not an anchor label). */
export const writerOf = (label: string): string => parseAnchorLabel(label)?.writer ?? '-';

/** The error every refused write and every later request gets: not retryable, the operator must act. */
export function anchorConflict(writers: readonly string[], self?: string): VaultError {
  const others = [...new Set(writers.filter((w) => w !== self))];
  return new VaultError(
    ErrorCodes.STATE_ROLLBACK_DETECTED,
    `another process wrote the HSM state anchor (writer ${others.join(', ') || '-'}${self ? `; this process is ${self}` : ''}): ` +
      'this vault stops serving rather than overwrite it. Only one process may write an anchor: stop the other, then restart this one.',
    { anchor: 'foreign-writer' },
  );
}

export const isAnchorConflict = (e: unknown): e is VaultError =>
  isVaultError(e, ErrorCodes.STATE_ROLLBACK_DETECTED) && e.detail?.anchor === 'foreign-writer';

/** One process's view of the two slots: which is newest, what each should hold, its writer id. */
export class AnchorBook {
  readonly writer = randomBytes(8).toString('hex');
  private latest: 0 | 1 = 0;
  private expected: AnchorExpectation | undefined;

  /** The newest anchor from both slots' labels. The first read is this process's starting point; later reads report foreign slots. */
  read(labels: readonly [string, string]): AnchorState {
    const [a, b] = labels.map(parseAnchorLabel);
    if (!a && !b) throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, 'no HSM state anchor slot holds a readable label');
    const newest: 0 | 1 = a && (!b || a.seq >= b.seq) ? 0 : 1;
    const state: AnchorState = newest === 0 ? a! : b!;
    if (!this.expected) {
      this.expected = [{ labels: [labels[0]] }, { labels: [labels[1]] }];
      this.latest = newest;
      return state;
    }
    const e = this.expected;
    const foreign = labels.filter((l, i) => !slotMatches(l, e[i]!)).map(writerOf);
    return foreign.length ? { ...state, foreign } : state;
  }

  /** The next write: never to the newest slot, so a torn write leaves the previous anchor intact. */
  plan(a: { seq: number; root: Uint8Array }): AnchorWrite {
    if (!this.expected) throw new VaultError(ErrorCodes.INTERNAL, 'the HSM anchor is written before it was read');
    const target: 0 | 1 = this.latest === 0 ? 1 : 0;
    return { target, seq: a.seq, label: anchorLabel(a.seq, a.root, this.writer), expect: structuredClone(this.expected) };
  }

  /** The refusal for a write that found `found` in the slots. */
  conflict(found: readonly string[]): VaultError {
    return anchorConflict(found.map(writerOf), this.writer);
  }

  wrote(w: AnchorWrite): void {
    this.expected![w.target] = { labels: [w.label] };
    this.latest = w.target;
  }

  /** The HSM call failed: the slot may hold the old label or this one (or one of the earlier failed ones). */
  failed(w: AnchorWrite): void {
    const e = this.expected![w.target];
    const own = e.own ? { writer: this.writer, lo: Math.min(e.own.lo, w.seq), hi: Math.max(e.own.hi, w.seq) } : { writer: this.writer, lo: w.seq, hi: w.seq };
    this.expected![w.target] = { labels: e.labels, own };
  }
}
