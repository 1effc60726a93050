"""A relay's connection budget: at most ``delivery.max_connections`` SMTP connections open at
once from one relay process, all sites together, handed out in the order sites asked.

The site throttles cap each site's connections cluster-wide (leases); nothing capped the sum
over sites at one relay, and a long tail of thousands of domains opened more sessions than the
next hop took (smtp-sink's 1,024). A relay takes slots here *before* it asks a throttle for
leases, and gives back the slots the throttle did not lease, so a site never holds a lease it
has no connection for (that would keep other relays from the site).

A site that finds no free slot waits in line (it is neither deferred nor failed): each slot
that frees goes to the site that has waited longest, and while any site waits, a connection
that finished its deliveries is not followed by another one to the same site (the relay asks
:meth:`RelaySlots.others_waiting`), so a busy site cannot keep the line waiting for good.

Except (:meth:`RelaySlots.keep`) for a site whose queue still calls for the connections it
has: it opens the next connection on the same slot, as long as the slots so kept are at most
half the cap. A long tail's line is thousands of one-message sites; without this a giant
provider's ten connections, each ending after its 100 deliveries, went to the back of that
line one by one, and the giant's mail (most of the traffic) waited seconds for each
(bench/README "Long tail", 2026-12-05 13:20). The other half of the slots still goes round
the line, so every waiting site gets its turn.

Pure: no I/O, no clock, no asyncio; the relay wakes the sites :meth:`RelaySlots.wakeable`
names. Bounded: one waiting entry per site, and the relay's site table is bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice

__all__ = ["RelaySlots"]


class RelaySlots:
    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"delivery.max_connections must be >= 1, got {cap}")
        self.cap = cap
        #: slots taken (connections open or being opened, leases being asked for)
        self.used = 0
        #: sites waiting for a slot, longest-waiting first
        self.waiting: OrderedDict[str, None] = OrderedDict()
        #: the most slots ever taken at once (operators: how close the relay came to its cap)
        self.peak = 0
        #: slots kept past a connection's end while sites waited (:meth:`keep`), at most
        #: half the cap
        self.kept = 0

    @property
    def free(self) -> int:
        return self.cap - self.used

    def take(self, site: str, n: int) -> int:
        """Up to ``n`` slots for ``site``: what is free once each site that waited longer has
        one kept for it. None: ``site`` joins the line (or keeps its place in it)."""
        if n <= 0:
            return 0
        free = self.free
        ahead = 0
        # at most ``free`` places are looked at: at the cap (the usual case while sites
        # wait, each of them asking again when woken) this is O(1), not O(sites waiting)
        for w in self.waiting:
            if w == site or ahead >= free:
                break
            ahead += 1
        k = max(0, min(n, free - ahead))
        if k:
            self.used += k
            self.peak = max(self.peak, self.used)
            self.waiting.pop(site, None)
        else:
            self.waiting.setdefault(site, None)
        return k

    def give(self, n: int) -> None:
        """``n`` slots back (connections closed, leases refused)."""
        if n < 0 or n > self.used:
            raise ValueError(f"giving back {n} slots with {self.used} taken")
        self.used -= n

    def leave(self, site: str) -> None:
        """``site`` no longer waits (its mail went, or was handed back)."""
        self.waiting.pop(site, None)

    def wakeable(self) -> list[str]:
        """The waiting sites a slot is free for now, longest-waiting first."""
        return list(islice(self.waiting, max(0, self.free)))

    def others_waiting(self, site: str) -> bool:
        """Whether a site other than ``site`` waits (O(1): asked once per message)."""
        return len(self.waiting) > (1 if site in self.waiting else 0)

    def keep(self, wanted: int, held: int) -> bool:
        """Whether a connection of a site that ended while other sites wait may be followed
        by the next one on the same slot: its queue still calls for ``wanted`` connections,
        at least the ``held`` it has, and the slots kept so are fewer than half the cap.
        True counts one kept slot, until :meth:`unkeep`."""
        if held < 1:
            raise ValueError(f"keep(): a site keeping a slot holds at least one, got {held}")
        if wanted < held or self.kept >= self.cap // 2:
            return False
        self.kept += 1
        return True

    def unkeep(self) -> None:
        """A slot kept by :meth:`keep` is given up (its connections are over)."""
        if self.kept <= 0:
            raise ValueError("unkeep() without a kept slot")
        self.kept -= 1
