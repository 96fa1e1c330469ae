// Answers leave in bursts: a group commit releases its whole batch at once, and
// a relay multiplexes many users over one connection. Holding a socket's writes
// to the end of the event-loop turn sends a burst with one write(2) instead of
// one per message; nothing waits longer than the turn it was sent in.
import type { Duplex } from 'node:stream';

/** Returns `hold()`: call it before each send; the socket is uncorked once, after this turn. */
export function corkPerTurn(socket: Duplex): () => void {
  let corked = false;
  return () => {
    if (corked) return;
    corked = true;
    socket.cork();
    setImmediate(() => {
      corked = false;
      socket.uncork();
    });
  };
}
