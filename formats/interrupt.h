// What SIGINT, SIGTERM and SIGHUP do to a running command.
#pragma once

#include <string>

namespace lora {

// Installs the handlers and the watchdog thread that every command runs
// under. The first signal asks the command to stop (request_interrupt in
// formats/error.h): it notices at its next step, unwinds, removes its
// partial output and exits 130 with one line. When it has not ended within
// `grace_seconds` (blocked in a read, a long library call), or when a
// second signal comes, the watchdog ends it: it removes every registered
// temp output (formats/staged-folder.h), prints
// `lora <command>: error: interrupted by SIGINT; nothing was left behind`
// and calls _exit(130). A third signal kills at once (the default action).
// Call once, from main, before any thread of ours starts. Throws nothing.
void install_interrupt_handling(const std::string& command, double grace_seconds = 2.0) noexcept;

// Called by main once the command has ended (it unwound, removing its temp
// outputs), before it prints its last line: from then on the watchdog does
// nothing, so that one line is printed, never two. When the watchdog has
// already begun a forced exit, this waits for it (it prints and exits).
void claim_exit() noexcept;

}  // namespace lora
