// A watch from a given revision that neither skips nor repeats history, around
// three traps of etcd3 1.1.2 measured with bench/etcd-probe.ts (etcd memo):
//
//  1. etcd3 resumes a broken watch stream from header.revision + 1. While a
//     watch catches up, every response's header.revision is the store's
//     CURRENT revision, not that of the events it carries: a reconnect in the
//     middle of a replay silently skipped the rest (1 000 of 10 003 events
//     delivered). Here the resume point is set back to the revision after the
//     last delivered event, after etcd3's own listeners ran (an EventEmitter
//     calls listeners in the order they were added; etcd3 adds its own in the
//     Watcher's constructor).
//  2. Listeners go on the Watcher before any response can arrive (.watcher(),
//     not .create()): a server-side cancel follows 'connected' at once on a
//     compacted start, and an 'error' without a listener throws.
//  3. After a server-side cancel the Watcher is already detached. Calling
//     cancel() on it sent a cancel for a dead watch id: it never resolved, the
//     reply threw "Failed to find watcher" out of a stream handler (an
//     uncaught exception), and the client's watch stream stopped serving its
//     other watchers. close() here cancels only a live watcher.
import type { Etcd3, IEvent, IResponseHeader, Watcher } from 'etcd3';

export interface WatchHandlers {
  /**
   * Events in revision order, each delivered once; several events may share a
   * revision (one txn), and they come in the order of the txn's operations.
   * An event's revision is ev.kv.mod_revision (for deletes too).
   */
  onEvents(events: IEvent[], header: IResponseHeader): void;
  /**
   * The server ended the watch: a start below the compaction revision (the
   * message is then "Watcher canceled: " with an empty reason), or another
   * server-side reason. Nothing more will come: rebuild from a snapshot.
   */
  onCanceled(err: Error): void;
}

export interface WatchFrom {
  readonly watcher: Watcher;
  /** The first revision not yet delivered. */
  next(): bigint;
  close(): Promise<void>;
}

export function watchFrom(client: Etcd3, prefix: string, fromRevision: bigint, h: WatchHandlers): WatchFrom {
  if (fromRevision < 1n) throw new RangeError('fromRevision must be >= 1');
  let next = fromRevision;
  let canceled = false;
  const w = client.watch().prefix(prefix).withPreviousKV().startRevision(String(fromRevision)).watcher();
  const pin = () => {
    (w.request as { start_revision?: string | number }).start_revision = String(next);
  };
  w.on('connected', pin);
  w.on('data', (res) => {
    // After a reconnect etcd sends from `next` again; never deliver twice.
    const fresh = res.events.filter((ev) => BigInt(ev.kv.mod_revision) >= next);
    if (fresh.length > 0) next = BigInt(fresh[fresh.length - 1]!.kv.mod_revision) + 1n;
    pin();
    if (fresh.length > 0) h.onEvents(fresh, res.header);
  });
  w.on('error', (err) => {
    canceled = true;
    h.onCanceled(err);
  });
  return {
    watcher: w,
    next: () => next,
    async close() {
      if (canceled) return;
      canceled = true;
      await w.cancel();
    },
  };
}
