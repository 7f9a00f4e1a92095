package rs.fleet

import java.io.File
import java.nio.file.Files
import java.util.Base64
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.AfterAll
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestInstance
import org.junit.jupiter.api.assertThrows

/**
 * A device through the Kotlin bindings against a real Mosquitto (mutual TLS,
 * the fleet's ACL) and a real `fleet serve`: telemetry, a shadow round trip,
 * a job, a command, and an OTA update into slots written in Kotlin.
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS)
class DeviceTest {
    private lateinit var cloud: Cloud

    @BeforeAll
    fun up() {
        cloud = Cloud()
    }

    @AfterAll
    fun down() = cloud.close()

    private fun tmp(): File = Files.createTempDirectory("kt-state").toFile()

    private suspend fun Agent.next(timeoutMs: Long = 30_000, pred: (AgentEvent) -> Boolean): AgentEvent =
        withTimeout(timeoutMs) {
            while (true) {
                val ev = nextEvent() ?: error("the agent stopped")
                if (pred(ev)) return@withTimeout ev
            }
            @Suppress("UNREACHABLE_CODE")
            error("unreachable")
        }

    /** Runs `block` with a connected device. Returns Unit: JUnit runs only void test methods. */
    private fun device(block: suspend (Agent) -> Unit): Unit = runBlocking {
        Agent.start(cloud.config("kt-device", tmp())).use { agent ->
            agent.next { it is AgentEvent.Connected }
            try {
                block(agent)
            } finally {
                agent.shutdown()
            }
        }
    }

    /**
     * Issue 23 from Kotlin: the device's key is made in a SoftHSM2 token and
     * never leaves it; the device provisions by claim through Mosquitto (the
     * certificate request signed in the token) and connects with it.
     */
    @Test
    fun aDeviceWithItsKeyInATokenProvisionsAndConnects() = runBlocking {
        val label = "kt-${ProcessHandle.current().pid()}"
        val util = listOf("/usr/bin/softhsm2-util", "/usr/local/bin/softhsm2-util").firstOrNull { File(it).canExecute() }
            ?: error("SoftHSM2 is needed: apt-get install softhsm2")
        val module = listOf("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
            .firstOrNull { File(it).exists() } ?: error("SoftHSM2 is needed: apt-get install softhsm2")
        val init = ProcessBuilder(util, "--init-token", "--free", "--label", label, "--so-pin", "so-pin-0000", "--pin", "user-pin-1234")
            .redirectErrorStream(true).start()
        val initOut = init.inputStream.bufferedReader().readText()
        check(init.waitFor() == 0) { "softhsm2-util: $initOut" }
        val dir = tmp()
        val pin = dir.resolve("pin").apply { writeText("user-pin-1234\n") }
        fun uri(obj: String, pinFile: File = pin) = "pkcs11:token=$label;object=$obj?module-path=$module&pin-source=file:${pinFile.path}"

        assertEquals(32, pkcs11GenerateKey(uri("receipts"), KeyAlgorithm.ED25519).size)
        assertThrows<FleetException.Rejected> { pkcs11GenerateKey(uri("receipts"), KeyAlgorithm.ED25519) }
        val wrong = dir.resolve("wrong-pin").apply { writeText("0000\n") }
        assertThrows<FleetException.Unauthorized> { pkcs11PublicKey(uri("receipts", wrong)) }
        assertThrows<FleetException.InvalidArgument> { pkcs11PublicKey("pkcs11:token=$label;object=x?pin-value=1234") }

        val state = dir.resolve("state")
        val claim = ClaimConfig(
            host = "localhost", port = cloud.port.toUShort(),
            claimCertPem = cloud.read("claims/${Cloud.CLAIM}.pem"), claimKeyPem = cloud.read("claims/${Cloud.CLAIM}.key"),
            caPem = cloud.read("ca.pem"), template = "default", parameters = mapOf("SerialNumber" to "kt-hsm"),
            thingName = "thing-kt-hsm", stateDir = state.path, timeoutMs = 10_000uL, pkcs11Uri = uri("device"),
        )
        val me = provisionByClaim(claim)
        assertEquals("thing-kt-hsm", me.thingName)
        assertEquals("", me.keyPem, "no key leaves the token")
        assertTrue(!state.resolve("device.key").exists())
        assertEquals(65, pkcs11PublicKey(uri("device")).size)
        val config = AgentConfig(
            host = "localhost", port = cloud.port.toUShort(), thing = me.thingName, certPem = me.certPem,
            caPem = cloud.read("ca.pem"), pkcs11Uri = uri("device"), stateDir = dir.resolve("agent").path,
        )
        Agent.start(config).use { agent ->
            agent.next { it is AgentEvent.Connected }
            val d = agent.publish("telemetry", """{"key": "in a token"}""".toByteArray(), Qos.AT_LEAST_ONCE)
            withTimeout(15_000) { d.acknowledged() }
            agent.shutdown()
        }
    }

    @Test
    fun badInputIsATypedError() {
        assertThrows<FleetException.InvalidArgument> {
            Agent.start(AgentConfig(host = "localhost", port = 1u, thing = "bad/name", certPem = "x", keyPem = "y", caPem = "z"))
        }
        assertThrows<FleetException.InvalidArgument> { shadowDelta("[1]", "{}") }
    }

    @Test
    fun telemetryIsAcknowledged() = device { agent ->
        val d = agent.publish("telemetry", """{"t": 21.5}""".toByteArray(), Qos.AT_LEAST_ONCE)
        withTimeout(20_000) { d.acknowledged() }
        assertEquals(DeliveryState.Acknowledged, d.state())
        val batch = agent.publishBatch("telemetry", listOf("1".toByteArray(), "2".toByteArray()))
        batch.forEach { withTimeout(20_000) { it.acknowledged() } }
        assertEquals(listOf(d.seq() + 1u, d.seq() + 2u), batch.map { it.seq() })
    }

    @Test
    fun shadowRoundTrip() = device { agent ->
        cloud.cli("shadow", "update", "kt-device", """{"colour": "red"}""")
        val ev = agent.next { it is AgentEvent.ShadowDelta && it.delta.contains("colour") } as AgentEvent.ShadowDelta
        assertEquals("""{"colour":"red"}""", ev.delta)
        val version = agent.report(null, ev.delta)
        assertTrue(version > ev.version)
        val shadow = cloud.cli("shadow", "get", "kt-device")
        assertTrue(Regex(""""reported"\s*:\s*\{[^}]*"colour"\s*:\s*"red"""").containsMatchIn(shadow), shadow)
        assertThrows<FleetException.InvalidArgument> { agent.report(null, "[1]") }
        Unit
    }

    /** `probe()` once `pred` holds of it (polled for 20 s). */
    private fun until(probe: () -> String, pred: (String) -> Boolean): String {
        val deadline = System.nanoTime() + 20_000_000_000L
        while (true) {
            val got = probe()
            if (pred(got)) return got
            check(System.nanoTime() < deadline) { "still $got" }
            Thread.sleep(200)
        }
    }

    @Test
    fun presenceAndInventoryReachTheFleetIndex(): Unit = runBlocking {
        val inventory = InventoryConfig(hardwareId = "board-kt", components = mapOf("firmware" to "3.1.0"))
        val agent = Agent.start(cloud.config("kt-device", tmp(), inventory = inventory, presence = true))
        agent.next { it is AgentEvent.Connected }
        val query = "connectivity.connected:true AND inventory.components.firmware:3.1.0 AND inventory.hardwareId:board-kt"
        until({ cloud.cli("thing", "search", query) }) { it.contains("\"kt-device\"") }
        agent.shutdown()
        agent.close()
        val shown = until({ cloud.cli("thing", "get", "kt-device") }) {
            Regex(""""connected"\s*:\s*false""").containsMatchIn(it)
        }
        assertTrue(shown.contains("CLIENT_INITIATED_DISCONNECT"), shown)
    }

    @Test
    fun aJobRunsToSuccess() = device { agent ->
        cloud.cli("job", "create", "kt-job-1", """{"operation": "reboot"}""", "--thing", "kt-device")
        val ev = agent.next { it is AgentEvent.Job } as AgentEvent.Job
        assertEquals("kt-job-1", ev.jobId)
        agent.updateJob(JobStatus.IN_PROGRESS, mapOf("step" to "rebooting"))
        agent.updateJob(JobStatus.SUCCEEDED, null)
        val executions = cloud.cli("job", "executions", "kt-job-1")
        assertTrue(executions.contains("SUCCEEDED"), executions)
    }

    @Test
    fun aCommandIsAnswered() = device { agent ->
        val sender = cloud.start("command", "send", "kt-device", "ping", "--payload", """{"n": 7}""", "--timeout", "30")
        val ev = agent.next { it is AgentEvent.Command } as AgentEvent.Command
        assertEquals("ping", ev.command)
        agent.respond(ev.executionId, CommandStatus.SUCCEEDED, """{"pong": 7}""")
        val out = sender.inputStream.bufferedReader().readText()
        assertTrue(sender.waitFor(60, TimeUnit.SECONDS) && sender.exitValue() == 0, sender.errorStream.bufferedReader().readText())
        assertTrue(Regex(""""pong"\s*:\s*7""").containsMatchIn(out), out)
        assertThrows<FleetException.Rejected> { agent.respond(ev.executionId, CommandStatus.SUCCEEDED, "{}") }
        Unit
    }

    @Test
    fun aListenerGetsEventsUntilCancelled(): Unit = runBlocking {
        val channel = Channel<AgentEvent>(Channel.UNLIMITED)
        Agent.start(cloud.config("kt-device", tmp(), clientId = "kt-device-listener")).use { agent ->
            val subscription = agent.subscribe(object : EventListener {
                override fun onEvent(event: AgentEvent) {
                    channel.trySend(event)
                }
                override fun onStopped() {
                    channel.close()
                }
            })
            val ev = withTimeout(30_000) { channel.receive() }
            assertTrue(ev is AgentEvent.Connected, "$ev")
            assertTrue(subscription.isActive())
            subscription.cancel()
            subscription.close()
            agent.shutdown()
        }
    }

    @Test
    fun toolsSignAndVerify() {
        val k = generateSigningKey()
        val root = trustRootForKey(k.publicKey)
        val image = ByteArray(1000) { (it % 7).toByte() }
        val env = signManifest(manifestForImage("fw", "1.0", 3uL, image, listOf("p100")), listOf(k.secretKey))
        val info = verifyManifest(root, env, "p100", 2uL, 1uL shl 20, null)
        assertEquals(3uL, info.sequence)
        verifyImage(info, image)
        assertThrows<FleetException.Rejected> { verifyManifest(root, env, "p200", 2uL, 1uL shl 20, null) }
        val out = shadowProcess(null, "pump-7", ShadowOperation.UPDATE, """{"state":{"desired":{"on":true}}}""", 1_700_000_000uL)
        assertEquals(listOf("update/accepted", "update/delta", "update/documents"), out.messages.map { it.topic })
    }

    /** A/B slots in memory with a bootloader ([boot]) that takes a pending trial once. */
    class MemorySlots(sequence: ULong) : FirmwareSlots {
        val images = mutableMapOf(Slot.A to ByteArray(0), Slot.B to ByteArray(0))
        val sequences = mutableMapOf(Slot.A to sequence, Slot.B to 0uL)
        var active = Slot.A
        private var current = Slot.A
        private var trial: Slot? = null
        private var record: ByteArray? = null

        fun boot() {
            current = trial ?: active
            trial = null
        }

        override fun booted() = current
        override fun installedSequence() = sequences.getValue(current)
        override fun capacity() = 1uL shl 20

        @Synchronized
        override fun write(slot: Slot, offset: ULong, data: ByteArray) {
            val img = images.getValue(slot)
            if (offset.toInt() > img.size) throw FleetException.Storage("a gap in the image")
            images[slot] = img.copyOf(offset.toInt()) + data
        }

        override fun setTrialBoot(slot: Slot) {
            trial = slot
        }

        override fun confirm(slot: Slot, sequence: ULong) {
            active = slot
            sequences[slot] = sequence
        }

        override fun reboot() {}
        override fun loadRecord() = record
        override fun saveRecord(record: ByteArray) {
            this.record = record
        }
        override fun clearRecord() {
            record = null
        }
    }

    @Test
    fun otaUpdateIntoKotlinSlots(): Unit = runBlocking {
        val release = generateSigningKey()
        val receipt = generateSigningKey()
        cloud.cli("thing", "set-attributes", "kt-ota", "--attribute", "receiptKey=" + Base64.getEncoder().encodeToString(receipt.publicKey))
        val image = ByteArray(40_000) { (it % 251).toByte() }
        val envelope = signManifest(manifestForImage("kt-fw", "2.0.0", 2uL, image, listOf("rig-1")), listOf(release.secretKey))
        val dir = tmp()
        dir.resolve("fw.env").writeBytes(envelope)
        dir.resolve("fw.bin").writeBytes(image)
        cloud.cli("release", "upload", "kt-fw-2", "--envelope", dir.resolve("fw.env").path, "--image", dir.resolve("fw.bin").path)

        val slots = MemorySlots(1uL)
        val ota = OtaConfig(
            trustRoot = trustRootForKey(release.publicKey), hardwareId = "rig-1", receiptKey = receipt.secretKey,
            slots = slots, selfTest = object : SelfTest { override fun run() = true },
        )
        val state = dir.resolve("state")
        var campaign: Process? = null
        Agent.start(cloud.config("kt-ota", state, ota)).use { agent ->
            agent.next { it is AgentEvent.Connected }
            campaign = cloud.start("campaign", "start", "kt-rollout", "--release", "kt-fw-2", "--thing", "kt-ota", "--watch")
            val ev = agent.next(60_000) { it is AgentEvent.RebootRequired || it is AgentEvent.OtaRejected }
            assertTrue(ev is AgentEvent.RebootRequired, "$ev")
            assertArrayEquals(image, slots.images.getValue(Slot.B))
            agent.shutdown()
        }
        slots.boot()
        Agent.start(cloud.config("kt-ota", state, ota)).use { agent ->
            val ev = agent.next(60_000) { it is AgentEvent.OtaFinished } as AgentEvent.OtaFinished
            assertTrue(ev.committed)
            assertEquals(Slot.B, slots.active)
            val c = checkNotNull(campaign)
            assertTrue(c.waitFor(90, TimeUnit.SECONDS), "the campaign did not finish")
            assertEquals(0, c.exitValue(), c.errorStream.bufferedReader().readText())
            agent.shutdown()
        }
    }

    @Test
    fun theExampleRunsADevice(): Unit = runBlocking {
        val lines = File("examples/Device.kt").readLines().size
        assertTrue(lines < 40, "the example has $lines lines")
        val acknowledged = runExample(cloud.dir, cloud.port, "kt-device", 3)
        assertEquals(3, acknowledged)
    }
}
