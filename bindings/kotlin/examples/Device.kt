// A fleet device in Kotlin: reports its shadow, applies desired changes,
// answers `ping`, and sends `count` telemetry readings, each acknowledged.
// (`fleet dev-setup --dir dev --thing pump-1` writes the files it reads.)
package rs.fleet

import java.io.File
import kotlinx.coroutines.*

suspend fun runExample(dir: File, port: Int, thing: String, count: Int): Int = coroutineScope {
    val agent = Agent.start(AgentConfig(
        host = "localhost", port = port.toUShort(), thing = thing,
        certPem = dir.resolve("things/$thing.pem").readText(),
        keyPem = dir.resolve("things/$thing.key").readText(),
        caPem = dir.resolve("ca.pem").readText(), stateDir = dir.resolve(thing).path))
    println("version " + agent.report(null, """{"firmware": "1.0"}"""))
    val events = launch {
        while (true) {
            when (val ev = agent.nextEvent() ?: break) {
                is AgentEvent.ShadowDelta -> agent.report(ev.shadow, ev.delta) // apply, then report
                is AgentEvent.Command -> agent.respond(ev.executionId, CommandStatus.SUCCEEDED, """{"pong": true}""")
                else -> {}
            }
        }
    }
    var acknowledged = 0
    repeat(count) { n ->
        agent.publish("telemetry", """{"n": $n}""".toByteArray(), Qos.AT_LEAST_ONCE).acknowledged()
        acknowledged++
        delay(100)
    }
    events.cancel()
    agent.shutdown()
    agent.close()
    acknowledged
}

fun main(args: Array<String>) = runBlocking {
    runExample(File(args[0]), args[1].toInt(), args[2], args.getOrElse(3) { "10" }.toInt()).let { println("acknowledged $it") }
}
