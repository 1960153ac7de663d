//! The control side of save and restore on a [`VspChannel`]: save begin/continue/end, resume,
//! completing a migration, restoring the channel record and the KMCL chunks, finishing a restore.

use super::*;

impl<L: DispatchLock<DeliveryTable>> VspChannel<'_, L> {
    /// Starts a save: freezes posts, pauses the channel, `VmbChannelSaveBegin`. Returns the
    /// channel record with the save's identity, which must be restored before the KMCL chunks.
    /// PASSIVE_LEVEL.
    pub fn save_begin(&self) -> Result<SaveRecord> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Running, Phase::Saved, Phase::SaveFailed])?;
        let vsp = self.vsp();
        if let Err(status) = vsp.freeze_posts() {
            self.resume_locked();
            return Err(status);
        }
        self.channel.pause();
        if let Err(status) = self.channel.save_begin() {
            self.resume_locked();
            return Err(status);
        }
        vsp.save_produced_last_chunk.store(false, Ordering::Release);
        let saved = vsp.table.with(|table| {
            let in_flight = table.begin_save();
            let identity = table.save_identity;
            let record = ChannelRecord {
                next_sequence: table.next_sequence,
                protocol_version: table.protocol_version,
                max_in_flight: table.capacity(),
                max_message_len: self.config.max_message_len,
                in_flight,
                stats: table.stats,
            };
            identity.map(|identity| SaveRecord { record, identity })
        });
        let Some(saved) = saved else {
            // `begin_save` always sets an identity; stay total rather than panic.
            self.channel.save_end();
            self.resume_locked();
            return Err(NtStatus::UNSUCCESSFUL);
        };
        vsp.set_phase(Phase::Saving);
        Ok(saved)
    }

    /// `VmbChannelSaveContinue` into the caller's buffer (see [`SaveChunk`]).
    ///
    /// After KMCL produced the last chunk (`STATUS_SUCCESS`) a further call is refused with
    /// `STATUS_INVALID_DEVICE_STATE` without reaching KMCL, which forbids it.
    pub fn save_continue(&self, buffer: &mut [u8]) -> Result<SaveChunk> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saving])?;
        let vsp = self.vsp();
        if vsp.save_produced_last_chunk.load(Ordering::Acquire) {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let chunk = self.channel.save_continue(buffer);
        if chunk.status == NtStatus::SUCCESS {
            vsp.save_produced_last_chunk.store(true, Ordering::Release);
        }
        Ok(chunk)
    }

    /// `VmbChannelSaveEnd`, then decides whether the save is usable for a migration: KMCL
    /// produced the last chunk, the save callback wrote every delivery in flight exactly once
    /// (size probes do not count), showed no packet without a delivery, and no delivery ended
    /// since the save began. Otherwise the save failed (`STATUS_INVALID_DEVICE_STATE`, phase
    /// `SaveFailed`): resume, or save again.
    pub fn save_end(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saving])?;
        self.channel.save_end();
        let vsp = self.vsp();
        let last_chunk = vsp.save_produced_last_chunk.load(Ordering::Acquire);
        let complete = last_chunk && vsp.table.with(|table| table.save.is_complete());
        if complete {
            vsp.set_phase(Phase::Saved);
            Ok(())
        } else {
            vsp.set_phase(Phase::SaveFailed);
            Err(NtStatus::INVALID_DEVICE_STATE)
        }
    }

    /// Resumes after a save that will not be used (aborted migration): delivery continues
    /// here, exactly once. Returns once posting works again — after `EvtChannelPostStarted` — or,
    /// if the guest's channel is not open, right after `VmbChannelStart` (posting then needs the
    /// guest anyway); the wait is bounded (`STATUS_IO_TIMEOUT` if the channel did not run again
    /// within it; the channel is resumed all the same).
    pub fn resume(&self) -> Result<()> {
        let _guard = self.control()?;
        let phase = self.expect_phase(&[Phase::Saving, Phase::Saved, Phase::SaveFailed])?;
        if phase == Phase::Saving {
            self.channel.save_end();
        }
        self.resume_locked();
        self.wait_until_running()
    }

    /// `VmbChannelSaveEnd` for a save that is being abandoned (teardown in the middle of it).
    pub(super) fn end_save_in_progress(&self) {
        if self.vsp().phase() == Phase::Saving {
            self.channel.save_end();
            self.vsp().set_phase(Phase::SaveFailed);
        }
    }

    fn resume_locked(&self) {
        let vsp = self.vsp();
        vsp.table.with(|table| {
            table.close_save();
            table.frozen = false;
        });
        self.channel.start();
        vsp.set_phase(Phase::Running);
    }

    /// Waits (bounded) until the channel runs after a `VmbChannelStart`, if the guest is there.
    fn wait_until_running(&self) -> Result<()> {
        let vsp = self.vsp();
        for _ in 0..START_WAIT_ROUNDS {
            if !vsp.guest_open.load(Ordering::Acquire) || vsp.table.with(|table| table.running) {
                return Ok(());
            }
            L::relax();
        }
        Err(NtStatus::IO_TIMEOUT)
    }

    /// Tears the saved channel down for a completed migration: in-flight deliveries come back
    /// cancelled and are recorded as [`OutcomeKind::Migrated`], not as failures.
    ///
    /// Refused (`STATUS_INVALID_DEVICE_STATE`, phase `SaveFailed`) unless the last save is
    /// complete and still current: if any delivery ended after it began (the VM was not stopped,
    /// so the guest kept acknowledging), the blob holds a delivery this channel already ended,
    /// and save again is the only way forward.
    pub fn complete_migration(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saved])?;
        let vsp = self.vsp();
        let current = vsp.table.with(|table| {
            let current = table.save.is_complete();
            if current {
                table.migrated = true;
            }
            current
        });
        if !current {
            vsp.set_phase(Phase::SaveFailed);
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        self.channel.disable();
        vsp.table.with(|table| table.close_save());
        vsp.set_phase(Phase::Migrated);
        Ok(())
    }

    /// Restores the channel record (first step of a restore).
    ///
    /// The record is validated against this channel's configuration; the deliveries that follow
    /// are validated against the record (its identity, sequence counter, message limit and
    /// delivery count).
    pub fn restore_channel_record(&self, bytes: &[u8]) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Initialized])?;
        let (record, identity) = ChannelRecord::decode_saved(bytes).map_err(restore_status)?;
        let vsp = self.vsp();
        if record.max_in_flight > self.config.max_in_flight
            || record.max_message_len > self.config.max_message_len
            || record.in_flight > self.config.max_in_flight
        {
            // Valid, but this channel was created with smaller limits than the saved one.
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if record.protocol_version != 0
            && !protocol::SUPPORTED_VERSIONS.contains(&record.protocol_version)
        {
            // Saved by a build that had negotiated a version this one does not speak.
            return Err(NtStatus::REVISION_MISMATCH);
        }
        vsp.table.with(|table| {
            table.next_sequence = record.next_sequence;
            table.protocol_version = record.protocol_version;
            table.stats = record.stats;
            table.restore_max_message_len = record.max_message_len;
            table.adopt_saved_identity(identity);
        });
        vsp.expected_restored
            .store(record.in_flight, Ordering::Release);
        vsp.keep_version_on_open
            .store(record.protocol_version != 0, Ordering::Release);
        vsp.set_phase(Phase::Restoring);
        Ok(())
    }

    /// Feeds one KMCL chunk, exactly as the save produced it.
    pub fn restore_chunk(&self, chunk: &[u8]) -> Result<RestoreProgress> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Restoring])?;
        let vsp = self.vsp();
        let mut status = self.channel.restore_from_buffer(chunk);
        if status == NtStatus::INVALID_DEVICE_STATE
            && !self.enabled_for_restore.load(Ordering::Acquire)
            && vsp.table.with(|table| table.restored) == 0
        {
            // Whether the library restores before or after `VmbChannelEnable` is undocumented
            // (docs/kmcl-bindings.md, "Undocumented points"). Before is tried first: nothing is
            // offered until the deliveries exist. A library that refuses it gets the channel
            // enabled but not started — no packet or completion is processed before Start — and
            // the same chunk again.
            self.channel.enable()?;
            self.enabled_for_restore.store(true, Ordering::Release);
            status = self.channel.restore_from_buffer(chunk);
        }
        if status == NtStatus::MORE_PROCESSING_REQUIRED {
            return Ok(RestoreProgress::NeedMore);
        }
        if let Err(status) = status.ok() {
            vsp.set_phase(Phase::RestoreFailed);
            return Err(status);
        }
        if let Err(status) = self.verify_restored() {
            vsp.set_phase(Phase::RestoreFailed);
            return Err(status);
        }
        vsp.set_phase(Phase::Restored);
        Ok(RestoreProgress::Complete)
    }

    /// Every delivery the record announced came back. Duplicates and surplus deliveries were
    /// already refused one by one as they were inserted.
    fn verify_restored(&self) -> Result<()> {
        let vsp = self.vsp();
        let expected = vsp.expected_restored.load(Ordering::Acquire);
        let (restored, in_flight) = vsp.table.with(|table| (table.restored, table.in_flight()));
        if restored != expected || in_flight != expected {
            return Err(NtStatus::DATA_ERROR);
        }
        Ok(())
    }

    /// Enables and starts a restored channel; restored deliveries continue.
    pub fn finish_restore(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Restored])?;
        self.enable_and_start()
    }

    /// Pauses and restarts the channel (`VmbChannelPause` + `VmbChannelStart`). PASSIVE.
    ///
    /// Kept for control clients built against the first interface: vmbsrv no longer stops its
    /// incoming queue on a garbled guest packet, so there is nothing to recover from.
    pub fn restart_incoming(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Running])?;
        let frozen = self.vsp().freeze_posts();
        if frozen.is_ok() {
            self.channel.pause();
        }
        self.resume_locked();
        frozen?;
        self.wait_until_running()
    }
}
