// Entry point: parses the command line, runs one subcommand, and turns every
// failure into one line on stderr and a documented exit code.
#include <signal.h>

#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include <fmt/format.h>

#include "cli/commands.h"
#include "formats/error.h"

namespace {

// SIGINT, SIGTERM and SIGHUP only ask the running command to stop: it
// notices at its next step (lora::check_interrupted), unwinds and removes
// its partial output, and exits 130. A second signal kills at once
// (SA_RESETHAND); system calls resume after the handler (SA_RESTART).
extern "C" void on_interrupt(int signal_number) { lora::request_interrupt(signal_number); }

void install_interrupt_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_RESETHAND;
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaction(s, &sa, nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lora: inspect, merge, extract and verify LoRA adapters stored as safetensors"};
  app.set_version_flag("--version", std::string("lora ") + LORA_VERSION);
  app.require_subcommand(1);
  app.failure_message(CLI::FailureMessage::simple);

  lora::cli::runner run;
  lora::cli::setup_inspect(app, run);
  lora::cli::setup_merge(app, run);
  lora::cli::setup_extract(app, run);
  lora::cli::setup_verify(app, run);
  lora::cli::setup_forward(app, run);
  lora::cli::setup_resize(app, run);
  lora::cli::setup_combine(app, run);
  lora::cli::setup_convert(app, run);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string cmd = app.get_subcommands().empty() ? "" : " " + app.get_subcommands().front()->get_name();
    fmt::print(stderr, "lora{}: error: {} (see 'lora{} --help')\n", cmd, e.what(), cmd);
    return static_cast<int>(lora::exit_code::usage);
  }

  const std::string cmd = app.get_subcommands().front()->get_name();
  install_interrupt_handlers();
  try {
    return run();
  } catch (const lora::error& e) {
    fmt::print(stderr, "lora {}: error: {}\n", cmd, e.what());
    return static_cast<int>(e.code());
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "lora {}: error: out of memory\n", cmd);
    return static_cast<int>(lora::exit_code::io);
  } catch (const std::exception& e) {
    fmt::print(stderr, "lora {}: error: internal error: {}\n", cmd, e.what());
    return static_cast<int>(lora::exit_code::invalid_input);
  }
}
