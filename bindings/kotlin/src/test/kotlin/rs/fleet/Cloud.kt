package rs.fleet

import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.concurrent.TimeUnit

/**
 * A real cloud for the tests: `fleet dev-setup` certificates, Mosquitto with
 * mutual TLS and the fleet's ACL, and `fleet serve` with its management API.
 * The cloud is driven with the `fleet` CLI (`--json`).
 */
class Cloud : AutoCloseable {
    val dir: File = Files.createTempDirectory("fleet-kotlin").toFile().resolve("dev")
    val fleetBin: String = System.getenv("FLEET_BIN")?.takeIf { it.isNotEmpty() }
        ?: File("../../target/debug/fleet").canonicalPath
    val port = freePort()
    private val apiPort = freePort()
    private val broker: Process
    private val service: Process
    val env: Map<String, String>

    init {
        check(File(fleetBin).canExecute()) { "the fleet binary is needed at $fleetBin: cargo build -p fleet-cloud (or FLEET_BIN=...)" }
        val mosquitto = listOfNotNull(System.getenv("MOSQUITTO"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
            .firstOrNull { File(it).canExecute() }
            ?: error("mosquitto is needed: apt-get install mosquitto (or MOSQUITTO=/path/to/mosquitto)")
        run(listOf(fleetBin, "dev-setup", "--dir", dir.path, "--port", "$port", "--thing", "kt-device", "--thing", "kt-ota", "--claim", CLAIM))
        val logs = dir.parentFile
        broker = ProcessBuilder(mosquitto, "-c", dir.resolve("mosquitto.conf").path)
            .redirectErrorStream(true).redirectOutput(logs.resolve("mosquitto.log")).start()
        waitPort(port, broker, "mosquitto")
        service = ProcessBuilder(fleetBin, "serve", "--dir", dir.path, "--broker", "localhost:$port", "--api", "127.0.0.1:$apiPort", "--claim", CLAIM)
            .redirectErrorStream(true).redirectOutput(logs.resolve("fleet-serve.log")).start()
        waitPort(apiPort, service, "fleet serve")
        env = mapOf(
            "FLEET_API" to "https://localhost:$apiPort",
            "FLEET_TOKEN_FILE" to dir.resolve("admin.token").path,
            "FLEET_CA" to dir.resolve("ca.pem").path,
        )
    }

    fun read(name: String): String = dir.resolve(name).readText()

    /** Starts `fleet ARGS --json` without waiting. */
    fun start(vararg args: String): Process {
        val pb = ProcessBuilder(listOf(fleetBin) + args + "--json")
        pb.environment().putAll(env)
        return pb.start()
    }

    /** Runs `fleet ARGS --json`; returns its output, failing on a non-zero exit. */
    fun cli(vararg args: String): String {
        val p = start(*args)
        val out = p.inputStream.bufferedReader().readText()
        val err = p.errorStream.bufferedReader().readText()
        check(p.waitFor(120, TimeUnit.SECONDS) && p.exitValue() == 0) { "fleet ${args.joinToString(" ")}: ${p.exitValue()} $err" }
        return out
    }

    fun config(
        thing: String,
        stateDir: File,
        ota: OtaConfig? = null,
        clientId: String? = null,
        inventory: InventoryConfig? = null,
        presence: Boolean = false,
    ) = AgentConfig(
        host = "localhost", port = port.toUShort(), thing = thing,
        certPem = read("things/$thing.pem"), keyPem = read("things/$thing.key"), caPem = read("ca.pem"),
        stateDir = stateDir.path, requestTimeoutMs = 2000uL, ota = ota, clientId = clientId,
        inventory = inventory, presence = presence,
    )

    override fun close() {
        for (p in listOf(service, broker)) {
            p.destroy()
            if (!p.waitFor(10, TimeUnit.SECONDS)) p.destroyForcibly()
        }
    }

    private fun run(cmd: List<String>) {
        val pb = ProcessBuilder(cmd).redirectErrorStream(true)
        pb.environment()["USER"] = System.getenv("USER")?.takeIf { it.isNotEmpty() } ?: "root"
        val p = pb.start()
        val out = p.inputStream.bufferedReader().readText()
        check(p.waitFor() == 0) { "${cmd.joinToString(" ")}: $out" }
    }

    companion object {
        /** The claim identity devices provision with. */
        const val CLAIM = "kt@factory"

        fun freePort(): Int = ServerSocket(0).use { it.localPort }

        fun waitPort(port: Int, proc: Process, what: String) {
            val deadline = System.nanoTime() + 20_000_000_000L
            while (System.nanoTime() < deadline) {
                check(proc.isAlive) { "$what exited with ${proc.exitValue()}" }
                try {
                    Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 500) }
                    return
                } catch (_: java.io.IOException) {
                    Thread.sleep(100)
                }
            }
            error("$what did not listen on $port")
        }
    }
}
