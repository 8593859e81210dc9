# bash completion for floe. Install: source this file from ~/.bashrc, or copy it to
# ~/.local/share/bash-completion/completions/floe
_floe() {
    local cur prev words cword
    _init_completion || return
    case "${words[1]}" in
        ask) COMPREPLY=($(compgen -W "--json --mode --conversation local cloud fused" -- "$cur")) ;;
        history)
            [[ $cword -eq 2 ]] && COMPREPLY=($(compgen -W "list show search export" -- "$cur")) ;;
        plugins)
            [[ $cword -eq 2 ]] && COMPREPLY=($(compgen -W "list install uninstall" -- "$cur")) ;;
        ledger) COMPREPLY=($(compgen -W "--json --full --limit" -- "$cur")) ;;
        doctor) COMPREPLY=($(compgen -W "--json" -- "$cur")) ;;
        *)
            [[ $cword -eq 1 ]] && COMPREPLY=($(compgen -W \
                "ask history ledger plugins doctor --model --version --help" -- "$cur")) ;;
    esac
}
complete -F _floe floe
