// Entry point: parses the command line, runs one subcommand, and turns every
// failure into one line on stderr and a documented exit code.
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include <fmt/format.h>

#include "cli/commands.h"
#include "formats/error.h"
#include "formats/interrupt.h"
#include "formats/mapped-file.h"

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
  lora::install_interrupt_handling(cmd);
  // the last line is ours or the interrupt watchdog's, never both
  auto finish = [&](int code, const std::string& line) {
    lora::claim_exit();
    if (!line.empty()) fmt::print(stderr, "lora {}: error: {}\n", cmd, line);
    return code;
  };
  try {
    const int code = run();
    lora::check_mapped_inputs();  // a result computed from an input that shrank is not one
    return finish(code, "");
  } catch (const lora::error& e) {
    return finish(static_cast<int>(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return finish(static_cast<int>(lora::exit_code::io), "out of memory");
  } catch (const std::exception& e) {
    return finish(static_cast<int>(lora::exit_code::invalid_input), std::string("internal error: ") + e.what());
  }
}
