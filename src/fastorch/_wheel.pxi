# The timer wheel of fastorch._core (included by _core.pyx).

# ---------------------------------------------------------------------------
# Timer wheel
#
# Six levels of 64 slots. A level-0 slot is one tick wide, a level-k slot
# 64**k ticks. A timer sits at the level of the highest bit in which its
# deadline differs from the wheel's current time, so every slot below the
# current position is empty and the earliest timer is in the lowest
# occupied level. Each level keeps a 64-bit occupancy word; finding the next
# occupied slot is a rotate and a count-trailing-zeros.

cdef enum:
    WHEEL_LEVELS = 6
    WHEEL_SLOTS = 64
    WHEEL_BITS = 6
    SLOT_DUE = WHEEL_LEVELS * WHEEL_SLOTS   # timers due now
    N_LISTS = SLOT_DUE + 1
    SLOT_NONE = -1

cdef uint64_t _WHEEL_SPAN = (<uint64_t>1) << (WHEEL_LEVELS * WHEEL_BITS)


cdef struct Timer:
    int64_t deadline      # in ticks
    int32_t next          # in its slot's list, or the free list
    int32_t prev
    uint32_t payload
    uint16_t gen          # bumped when the timer fires or is cancelled
    int16_t slot          # SLOT_NONE when free


cdef inline int _level_for(int64_t elapsed, int64_t when) noexcept:
    cdef uint64_t masked = (<uint64_t>elapsed ^ <uint64_t>when) | 63
    if masked >= _WHEEL_SPAN:
        # Deadlines are limited to 30 days, inside one turn of the top
        # level: its slots act as a ring.
        masked = _WHEEL_SPAN - 1
    return (63 - __builtin_clzll(masked)) // WHEEL_BITS


cdef inline uint64_t _rotr(uint64_t x, int n) noexcept:
    if n == 0:
        return x
    return (x >> n) | (x << (64 - n))


cdef class TimerWheel:
    """A hierarchical timing wheel: 6 levels of 64 slots of ``tick_ms``.

    ``schedule`` and ``cancel`` are O(1); ``advance`` jumps straight to
    the next occupied slot, so idle time costs nothing.
    """

    cdef Timer* _timers
    cdef int32_t _cap
    cdef int32_t _free
    cdef int32_t _count
    cdef int32_t _heads[N_LISTS]
    cdef uint64_t _occupied[WHEEL_LEVELS]
    cdef int64_t _elapsed        # ticks
    cdef int64_t _now_ms
    cdef int64_t _tick_ms

    def __cinit__(self, int64_t now=0, int64_t tick_ms=1):
        if tick_ms < 1 or tick_ms > 1000:
            raise EngineError(f"tick_ms must be 1..1000, got {tick_ms!r}")
        if now < 0:
            raise EngineError(f"now must be >= 0, got {now!r}")
        self._timers = NULL
        self._cap = 0
        self._free = -1
        self._count = 0
        cdef int i
        for i in range(N_LISTS):
            self._heads[i] = -1
        for i in range(WHEEL_LEVELS):
            self._occupied[i] = 0
        self._tick_ms = tick_ms
        self._now_ms = now
        self._elapsed = now // tick_ms
        self._grow(64)

    def __dealloc__(self):
        if self._timers != NULL:
            PyMem_Free(self._timers)
            self._timers = NULL

    cdef int _grow(self, int32_t want) except -1:
        cdef int32_t cap = self._cap
        cdef int32_t i
        cdef Timer* t
        if want <= cap:
            return 0
        if want < cap * 2:
            want = cap * 2
        t = <Timer*>PyMem_Realloc(self._timers, want * sizeof(Timer))
        if t == NULL:
            raise MemoryError()
        self._timers = t
        # NB: new entries go onto the free list in index order, so handles
        # are handed out low first.
        for i in range(want - 1, cap - 1, -1):
            t[i].slot = SLOT_NONE
            t[i].gen = 0
            t[i].next = self._free
            self._free = i
        self._cap = want
        return 0

    cdef inline void _link(self, int32_t idx, int slot) noexcept:
        cdef Timer* t = &self._timers[idx]
        cdef int32_t head = self._heads[slot]
        t.slot = slot
        t.prev = -1
        t.next = head
        if head >= 0:
            self._timers[head].prev = idx
        self._heads[slot] = idx
        if slot < SLOT_DUE:
            self._occupied[slot >> WHEEL_BITS] |= (
                (<uint64_t>1) << (slot & (WHEEL_SLOTS - 1)))

    cdef inline void _unlink(self, int32_t idx) noexcept:
        cdef Timer* t = &self._timers[idx]
        cdef int slot = t.slot
        if t.prev >= 0:
            self._timers[t.prev].next = t.next
        else:
            self._heads[slot] = t.next
        if t.next >= 0:
            self._timers[t.next].prev = t.prev
        if slot < SLOT_DUE and self._heads[slot] < 0:
            self._occupied[slot >> WHEEL_BITS] &= ~(
                (<uint64_t>1) << (slot & (WHEEL_SLOTS - 1)))
        t.slot = SLOT_NONE

    cdef inline void _place(self, int32_t idx) noexcept:
        cdef int64_t when = self._timers[idx].deadline
        cdef int level
        if when <= self._elapsed:
            self._link(idx, SLOT_DUE)
            return
        level = _level_for(self._elapsed, when)
        self._link(idx, level * WHEEL_SLOTS
                   + <int>((when >> (level * WHEEL_BITS)) & 63))

    cdef int32_t _add(self, int64_t deadline_ms, uint32_t payload) except -1:
        """Schedule a timer; returns its index."""
        cdef int32_t idx
        cdef Timer* t
        if self._free < 0:
            self._grow(self._cap + 1)
        idx = self._free
        t = &self._timers[idx]
        self._free = t.next
        # Round up: a timer never fires before its deadline.
        t.deadline = (deadline_ms + self._tick_ms - 1) // self._tick_ms
        t.payload = payload
        self._count += 1
        self._place(idx)
        return idx

    cdef inline void _release(self, int32_t idx) noexcept:
        cdef Timer* t = &self._timers[idx]
        t.gen += 1
        t.slot = SLOT_NONE
        t.next = self._free
        self._free = idx
        self._count -= 1

    cdef inline bint _remove(self, int32_t idx) noexcept:
        """Cancel a live timer by index; False if it is not live."""
        if idx < 0 or idx >= self._cap or self._timers[idx].slot == SLOT_NONE:
            return False
        self._unlink(idx)
        self._release(idx)
        return True

    cdef bint _next_slot(self, int* out_slot, int64_t* out_at) noexcept:
        """The earliest occupied wheel slot and the tick it starts at."""
        cdef int level, slot, now_slot
        cdef uint64_t occ
        cdef int64_t slot_range, level_range, at
        for level in range(WHEEL_LEVELS):
            occ = self._occupied[level]
            if occ == 0:
                continue
            now_slot = <int>((self._elapsed >> (level * WHEEL_BITS)) & 63)
            slot = (__builtin_ctzll(_rotr(occ, now_slot)) + now_slot) & 63
            slot_range = (<int64_t>1) << (level * WHEEL_BITS)
            level_range = slot_range << WHEEL_BITS
            at = (self._elapsed & ~(level_range - 1)) + slot * slot_range
            if at < self._elapsed:
                # Only the top level wraps around (see _level_for).
                at += level_range
            out_slot[0] = level * WHEEL_SLOTS + slot
            out_at[0] = at
            return True
        return False

    cdef int32_t _pop(self, int64_t now_ms) noexcept:
        """The next timer due at ``now_ms``, unlinked but not released;
        -1 when none is due. The caller reads it, then calls _release."""
        cdef int64_t now_tick = now_ms // self._tick_ms
        cdef int slot
        cdef int64_t at
        cdef int32_t idx, nxt
        while True:
            idx = self._heads[SLOT_DUE]
            if idx >= 0:
                self._unlink(idx)
                return idx
            if not self._next_slot(&slot, &at) or at > now_tick:
                if now_tick > self._elapsed:
                    self._elapsed = now_tick
                return -1
            # Take the whole slot; what is due moves to the due list, the
            # rest cascades down to a finer level.
            self._elapsed = at
            idx = self._heads[slot]
            self._heads[slot] = -1
            self._occupied[slot >> WHEEL_BITS] &= ~(
                (<uint64_t>1) << (slot & (WHEEL_SLOTS - 1)))
            while idx >= 0:
                nxt = self._timers[idx].next
                self._place(idx)
                idx = nxt

    cdef int64_t _next_deadline(self) noexcept:
        """Tick of the earliest slot holding a timer, in ms; -1 if none.

        For a slot above level 0 this is the slot's start, which can be
        earlier than the timer itself: the caller then wakes, the slot
        cascades, and the true deadline is reported next.
        """
        cdef int slot
        cdef int64_t at
        if self._heads[SLOT_DUE] >= 0:
            return self._elapsed * self._tick_ms
        if not self._next_slot(&slot, &at):
            return -1
        return at * self._tick_ms

    cdef int _set_now(self, int64_t now) except -1:
        if now < self._now_ms:
            raise EngineError(
                f"time went backwards: {now!r} < {self._now_ms!r}")
        self._now_ms = now
        return 0

    # -- Python API ---------------------------------------------------------

    @property
    def now(self):
        """The time of the last ``advance``, in ms."""
        return self._now_ms

    @property
    def tick_ms(self):
        """Width of a level-0 slot, in ms."""
        return self._tick_ms

    def schedule(self, int64_t deadline, uint32_t payload=0):
        """Schedule a timer at ``deadline`` (ms); returns its handle.

        Raises:
            EngineError: the deadline is more than 30 days after ``now``.
        """
        if deadline - self._now_ms > _MAX_DURATION:
            raise EngineError(
                f"deadline {deadline!r} is more than 30 days ahead")
        cdef int32_t idx = self._add(deadline, payload)
        return (<int64_t>self._timers[idx].gen << 32) | idx

    def cancel(self, int64_t handle):
        """Cancel a timer; False if it already fired or was cancelled."""
        cdef int64_t idx = handle & 0xFFFFFFFF
        if idx >= self._cap or handle < 0:
            return False
        if self._timers[idx].gen != <uint16_t>(handle >> 32):
            return False
        return self._remove(<int32_t>idx)

    def advance(self, int64_t now):
        """Move time to ``now``; returns the payloads of the timers fired,
        in deadline order."""
        self._set_now(now)
        cdef list fired = []
        cdef int32_t idx
        while True:
            idx = self._pop(now)
            if idx < 0:
                return fired
            fired.append(self._timers[idx].payload)
            self._release(idx)

    def next_deadline(self):
        """When ``advance`` should next be called, in ms, or None."""
        cdef int64_t at = self._next_deadline()
        return None if at < 0 else at

    def __len__(self):
        return self._count

    def memory_bytes(self):
        """Bytes of C memory the wheel holds."""
        return self._cap * sizeof(Timer)
