// The pool's waiting room: three FIFO lanes served in order, and admission.
//
//   lanes      control (anchor, epochs, ping), work in progress (OPRF
//              evaluation, verifier, seal/unseal, ...), new channels (the
//              channel-key ECDH of a handshake).
//   admission  only ECDH jobs — the first HSM call of a channel or of an
//              enrol/recover begin, made before any state changes — are
//              bounded. Past `maxQueue` waiting derives they fail at once with
//              OVERLOADED (retryable: nothing changed) instead of queueing
//              without bound; an OPRF evaluation (inside an open channel) gets
//              a little head room over new handshakes. Calls that complete work
//              already admitted (and the anchor write every answer waits for)
//              are never refused.
import { VaultError, ErrorCodes } from '../../../protocol/errors.js';
import type { HsmOp } from '../port.js';
import type { JobResult } from './worker.js';

export type Lane = 0 | 1 | 2;

/** A job before dispatch: its keys are named, and bound to handles only when sent. */
export interface Queued {
  spec: HsmOp | { op: 'ping' };
  derive: boolean;
  resolve: (r: JobResult) => void;
}

/** FIFO with O(1) shift. */
export class Fifo<T> {
  private items: T[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(x: T): void {
    this.items.push(x);
  }
  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const x = this.items[this.head]!;
    (this.items as (T | undefined)[])[this.head] = undefined;
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return x;
  }
  drain(): T[] {
    const out = this.items.slice(this.head);
    this.items = [];
    this.head = 0;
    return out;
  }
}

/** Which lane an operation waits in, and the bound on waiting derives it is admitted under (none: always admitted). */
export function admission(spec: Queued['spec'], maxQueue: number): { lane: Lane; bound?: number } {
  switch (spec.op) {
    case 'ecdh':
      return spec.key === 'kx' ? { lane: 2, bound: maxQueue } : { lane: 1, bound: Math.ceil(maxQueue * 1.25) };
    case 'readLabel':
    case 'casAnchor':
    case 'genSeal':
    case 'findSeal':
    case 'destroy':
    case 'ping':
      return { lane: 0 };
    default:
      return { lane: 1 };
  }
}

export class JobQueue {
  readonly lanes: [Fifo<Queued>, Fifo<Queued>, Fifo<Queued>] = [new Fifo(), new Fifo(), new Fifo()];
  /** ECDH jobs queued and not yet sent: what admission bounds. */
  waitingDerives = 0;
  /** Jobs refused with OVERLOADED since start. */
  overloaded = 0;

  constructor(private readonly maxQueue: number) {}

  /** Queue `spec` (its answer resolves the promise), or refuse it with OVERLOADED. */
  admit(spec: Queued['spec']): Promise<JobResult> {
    const { lane, bound } = admission(spec, this.maxQueue);
    const derive = spec.op === 'ecdh';
    if (bound !== undefined && this.waitingDerives >= bound) {
      this.overloaded++;
      return Promise.reject(new VaultError(ErrorCodes.OVERLOADED, 'the HSM is saturated; retry shortly'));
    }
    return new Promise<JobResult>((resolve) => {
      this.lanes[lane].push({ spec, derive, resolve });
      if (derive) this.waitingDerives++;
    });
  }

  /** Jobs waiting in `lanes`. */
  count(lanes: readonly Fifo<Queued>[] = this.lanes): number {
    let n = 0;
    for (const l of lanes) n += l.length;
    return n;
  }

  /** The next job from the first non-empty of `lanes`. */
  take(lanes: readonly Fifo<Queued>[]): Queued | undefined {
    for (const l of lanes) {
      const q = l.shift();
      if (q) {
        if (q.derive) this.waitingDerives--;
        return q;
      }
    }
    return undefined;
  }

  /** Answer every waiting job with `r` (the pool closed or cannot serve). */
  failAll(r: JobResult): void {
    for (const lane of this.lanes) for (const q of lane.drain()) q.resolve(r);
    this.waitingDerives = 0;
  }
}
